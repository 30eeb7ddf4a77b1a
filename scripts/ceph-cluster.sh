#!/usr/bin/env bash
# ceph-cluster.sh: a throw-away single-node Ceph cluster for vdisk's rbd tests and bench.
#
# One monitor and one OSD (memstore in RAM, or bluestore on a sparse file), optionally a
# manager, all on 127.0.0.1, every file under one directory, no systemd, no /etc/ceph.
# cephx auth; the pool is created and `rbd pool init`-ed. Daemons run as the caller.
#
#   ceph-cluster.sh start [DIR]      start (no-op when this DIR's cluster is already up)
#   ceph-cluster.sh stop [DIR]       stop the daemons this DIR recorded, nothing else
#   ceph-cluster.sh status [DIR]     exit 0 when our daemons are alive and the OSD is up
#   ceph-cluster.sh env [DIR]        print `export CEPH_CONF=...`
#   ceph-cluster.sh purge [DIR]      stop, then delete DIR
#   ceph-cluster.sh kill-osd [DIR]   SIGKILL the OSD (fault tests)
#   ceph-cluster.sh start-osd [DIR]  start the OSD again on its existing store (bluestore keeps data)
#
# DIR defaults to $VDISK_CEPH_DIR, else /var/tmp/vdisk-ceph-$UID.
# Knobs (environment):
#   CEPH_OSD_BACKEND   memstore | bluestore (memstore loses everything when the OSD stops)
#   CEPH_AUTH          cephx | none                       (default cephx)
#   CEPH_WITH_MGR      0 | 1 (rbd I/O needs no manager)    (default 0)
#   CEPH_POOL          the rbd pool                        (default rbd)
#   CEPH_MON_V2_PORT / CEPH_MON_V1_PORT  default 3300 / 6789; "auto" picks free ports
#   CEPH_MEMSTORE_BYTES / CEPH_BLUESTORE_BYTES   capacity (RAM / sparse file, used lazily)
#   CEPH_OSD_WATCH_TIMEOUT  seconds a killed client keeps its watch, and with it an rbd
#                      exclusive lock (Ceph's default 30)
#
# Learned the hard way (see also docs/rbd.md):
#  - ceph-mon --mkfs refuses a non-empty data directory: never pre-create files in it.
#  - bluestore's block file must not be $osd_data/block: bluestore symlinks that name to it.
#  - commands the manager serves hang without one: every client call here has a timeout.
set -euo pipefail

DIR=${2:-${VDISK_CEPH_DIR:-/var/tmp/vdisk-ceph-$(id -u)}}
BACKEND=${CEPH_OSD_BACKEND:-memstore}
AUTH=${CEPH_AUTH:-cephx}
WITH_MGR=${CEPH_WITH_MGR:-0}
POOL=${CEPH_POOL:-rbd}
V2PORT=${CEPH_MON_V2_PORT:-3300}
V1PORT=${CEPH_MON_V1_PORT:-6789}
MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-4294967296}
BLUESTORE_BYTES=${CEPH_BLUESTORE_BYTES:-4294967296}
WATCH_TIMEOUT=${CEPH_OSD_WATCH_TIMEOUT:-30}
IP=127.0.0.1
CONF=$DIR/ceph.conf
PIDS=$DIR/pid

log() { printf '[ceph-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Every client call: our conf and a hard limit, so a broken cluster never hangs a caller.
cephc() { timeout 60 ceph --conf "$CONF" --connect-timeout 30 "$@"; }

# Ours = alive and started with our conf file (a recycled PID has another command line).
# A zombie's cmdline is empty, so a stopped daemon nobody reaped does not count.
ours() {
  local pid=$1
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF"
}

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

# -f keeps the daemon in the foreground, so $! is the daemon itself, not a forked parent.
spawn() {
  local name=$1; shift
  nohup "$@" -f --conf "$CONF" >>"$DIR/log/$name.out" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
  log "started $name (pid $!)"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local fsid=$1
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:$IP:$V2PORT,v1:$IP:$V1PORT]
mon initial members = a
public addr = $IP
cluster addr = $IP
ms bind ipv6 = false
run dir = $DIR/run
crash dir = $DIR/crash
auth cluster required = $AUTH
auth service required = $AUTH
auth client required = $AUTH
# one replica and no host failure domain: a single OSD serves every PG
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
# the root file system is shared: never let the monitor stop because it looks full
mon data avail crit = 0
mon data avail warn = 1
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
# manager modules that open no listening sockets
mgr initial modules = iostat

[mon]
mon data = $DIR/mon.a
keyring = $DIR/mon.a/keyring
log file = $DIR/log/mon.a.log
mon cluster log file = $DIR/log/cluster.log

[mgr]
mgr data = $DIR/mgr.x
keyring = $DIR/mgr.x/keyring
log file = $DIR/log/mgr.x.log

[osd]
osd data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
log file = $DIR/log/osd.\$id.log
osd objectstore = $BACKEND
osd class load list = *
osd class default list = *
memstore device bytes = $MEMSTORE_BYTES
bluestore block path = $DIR/osd.\$id.block
bluestore block create = true
bluestore block size = $BLUESTORE_BYTES
bluestore fsck on mkfs = false
bluestore fsck on mount = false
osd memory target = 1073741824
osd client watch timeout = $WATCH_TIMEOUT

[client]
keyring = $DIR/keyring
log file = /dev/null
admin socket = ""
EOF
}

osd_up() { cephc osd stat -f json 2>/dev/null | grep -q '"num_up_osds":1'; }

running() {
  [[ -f $CONF ]] || return 1
  ours "$(pid_of mon.a)" && ours "$(pid_of osd.0)" || return 1
  if [[ $WITH_MGR == 1 ]]; then ours "$(pid_of mgr.x)" || return 1; fi
  osd_up
}

stop_one() {
  local name=$1 pid n
  pid=$(pid_of "$name")
  if ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for n in $(seq 50); do ours "$pid" || break; sleep 0.1; done
    if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$PIDS/$name.pid"
}

do_stop() {
  [[ -d $PIDS ]] || return 0
  local f
  # clients of the monitor first, the monitor last
  for f in "$PIDS"/osd.*.pid "$PIDS"/mgr.*.pid "$PIDS"/mon.*.pid; do
    [[ -f $f ]] && stop_one "$(basename "$f" .pid)"
  done
  return 0
}

wait_osd_up() {
  local n
  for n in $(seq 240); do
    osd_up && return 0
    ours "$(pid_of osd.0)" || die "osd.0 exited; see $DIR/log/osd.0.log"
    sleep 0.25
  done
  die "osd.0 is not up after 60 s; see $DIR/log/osd.0.log"
}

do_start() {
  if running; then log "already running: export CEPH_CONF=$CONF"; return 0; fi
  command -v ceph-mon >/dev/null || die "ceph-mon not installed (apt-get install ceph-mon ceph-osd ceph-common)"
  do_stop # leftovers of a crashed run are ours to clear; memstore kept nothing anyway
  rm -rf "$DIR"
  mkdir -p "$DIR"/{log,run,crash,pid,osd.0}
  [[ $V2PORT == auto ]] && V2PORT=$(free_port)
  [[ $V1PORT == auto ]] && V1PORT=$(free_port)
  local fsid uuid key
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$fsid"

  if [[ $AUTH == cephx ]]; then
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$DIR/keyring" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  else
    : >"$DIR/keyring"
  fi

  monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:$IP:$V2PORT,v1:$IP:$V1PORT]" "$DIR/monmap" >/dev/null
  ceph-mon --conf "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" >>"$DIR/log/mkfs.log" 2>&1 \
    || die "ceph-mon --mkfs failed; see $DIR/log/mkfs.log"
  [[ -d $DIR/mon.a/store.db ]] || die "ceph-mon --mkfs made no store; see $DIR/log/mkfs.log"
  spawn mon.a ceph-mon -i a

  if [[ $WITH_MGR == 1 ]]; then
    mkdir -p "$DIR/mgr.x"
    if [[ $AUTH == cephx ]]; then
      cephc auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$DIR/mgr.x/keyring"
    else
      : >"$DIR/mgr.x/keyring"
    fi
    spawn mgr.x ceph-mgr -i x
  fi

  uuid=$(cat /proc/sys/kernel/random/uuid)
  if [[ $AUTH == cephx ]]; then
    key=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$key" >"$DIR/osd.0/new.json"
    cephc osd new "$uuid" 0 -i "$DIR/osd.0/new.json" >/dev/null
    rm -f "$DIR/osd.0/new.json"
    printf '[osd.0]\n\tkey = %s\n' "$key" >"$DIR/osd.0/keyring"
    ceph-osd --conf "$CONF" -i 0 --mkfs --key "$key" --osd-uuid "$uuid" >>"$DIR/log/mkfs.log" 2>&1 \
      || die "ceph-osd --mkfs failed; see $DIR/log/mkfs.log"
  else
    cephc osd new "$uuid" 0 >/dev/null
    : >"$DIR/osd.0/keyring"
    ceph-osd --conf "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$DIR/log/mkfs.log" 2>&1 \
      || die "ceph-osd --mkfs failed; see $DIR/log/mkfs.log"
  fi
  spawn osd.0 ceph-osd -i 0
  wait_osd_up

  cephc osd pool create "$POOL" 8 8 >/dev/null 2>&1
  timeout 60 rbd --conf "$CONF" pool init "$POOL"
  log "ready: export CEPH_CONF=$CONF (pool $POOL, auth $AUTH, osd $BACKEND)"
}

case ${1:-} in
  start) do_start ;;
  stop) do_stop ;;
  status) running || { log "not running ($DIR)"; exit 1; } ;;
  env) echo "export CEPH_CONF=$CONF" ;;
  purge) do_stop; rm -rf "$DIR" ;;
  kill-osd)
    pid=$(pid_of osd.0)
    ours "$pid" || die "osd.0 of $DIR is not running"
    kill -KILL "$pid"
    for n in $(seq 50); do ours "$pid" || break; sleep 0.1; done
    rm -f "$PIDS/osd.0.pid"
    log "killed osd.0 (pid $pid)" ;;
  start-osd)
    ours "$(pid_of osd.0)" && die "osd.0 of $DIR is already running"
    spawn osd.0 ceph-osd -i 0
    wait_osd_up ;;
  *) echo "usage: $0 start|stop|status|env|purge|kill-osd|start-osd [DIR]" >&2; exit 2 ;;
esac
