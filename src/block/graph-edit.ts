// Editing a live block graph: the one drain-and-replace operation that external snapshots,
// mirror pivot, commit and stream completion, and filter insertion (copy-before-write,
// throttle) all use (QEMU's bdrv_drained_begin/end, bdrv_replace_node, bdrv_insert_node,
// bdrv_drop_filter, bdrv_set_backing_hd).
//
// Drain: every BlockBackend above the drained nodes stops passing new requests down (they
// wait in the backend) and the requests already in flight finish. Only then does the edit
// run, so no request is split between the old graph and the new one: a request that was in
// flight completes on the old node, a request issued meanwhile runs on the new one.
// Requests made directly on nodes (not through a BlockBackend) are not held back, as in
// QEMU, but the drain waits for those in flight on the drained nodes themselves.
import { BlockBackend } from './backend.js';
import { ChildEdge, type EdgeParent } from './edge.js';
import { VdiskError, invalidArgument } from './errors.js';
import { BlockNode } from './node.js';

/** Every BlockBackend reachable upward from `nodes` through parent edges. */
function backendsAbove(nodes: Iterable<BlockNode>): Set<BlockBackend> {
  const out = new Set<BlockBackend>();
  const seen = new Set<BlockNode>();
  const stack = [...nodes];
  while (stack.length > 0) {
    const n = stack.pop()!;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const e of n.parents) {
      const p = e.parent;
      if (p instanceof BlockBackend) out.add(p);
      else if (p instanceof BlockNode) stack.push(p);
    }
  }
  return out;
}

/**
 * Run `fn` with `nodes` drained: new requests from every BlockBackend above them wait, the
 * ones in flight (through those backends, or on the nodes themselves) have finished when
 * `fn` starts; afterwards the held requests go on. Sections nest.
 */
export async function drained<T>(nodes: BlockNode | Iterable<BlockNode>, fn: () => T | Promise<T>): Promise<T> {
  const list = nodes instanceof BlockNode ? [nodes] : [...nodes];
  // The set is taken once: backends whose root moves during fn are the same objects.
  const backends = backendsAbove(list);
  for (const b of backends) b.drainedBegin();
  try {
    // A request that was in a backend's queue may have started on a node since: loop until quiet.
    for (;;) {
      await Promise.all([...[...backends].map((b) => b.drain()), ...list.map((n) => n.waitIdle())]);
      if ([...backends].every((b) => b.requestsInFlight === 0) && list.every((n) => n.requestsInFlight === 0)) break;
    }
    return await fn();
  } finally {
    for (const b of backends) b.drainedEnd();
  }
}

/** Is `edge` one of the edges reachable downward from `root` (so moving it to `root` makes a loop)? */
function inSubtree(root: BlockNode, edge: ChildEdge): boolean {
  const seen = new Set<BlockNode>();
  const queue = [root];
  while (queue.length > 0) {
    const n = queue.shift()!;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const c of n.children) {
      if (c === edge) return true;
      queue.push(c.node);
    }
  }
  return false;
}

/** A parent that writes through this edge needs a writable child. */
function needsWrite(edge: ChildEdge): boolean {
  const p: EdgeParent | null = edge.parent;
  if (p instanceof BlockBackend) return !p.readOnly;
  if (p instanceof BlockNode) return !p.readOnly && edge.role !== 'backing';
  return false;
}

function parentName(edge: ChildEdge): string {
  const p = edge.parent;
  return p instanceof BlockNode ? `'${p.filename}'` : 'a block backend';
}

function checkTarget(edge: ChildEdge, to: BlockNode): void {
  if (needsWrite(edge) && to.readOnly) {
    throw new VdiskError('EPERM', 'permission',
      `Cannot move the ${edge.role} child of ${parentName(edge)} to '${to.filename}': it is read-only and the parent writes`);
  }
}

function checkUsable(n: BlockNode, what: string): void {
  if (n.isClosed) throw new VdiskError('ESHUTDOWN', 'io', `${what} '${n.filename}' is closed`);
}

/** Move the edges (already drained), then refresh caps and limits from their parents upward. */
function moveEdges(edges: ChildEdge[], to: BlockNode): void {
  for (const e of edges) checkTarget(e, to);
  for (const e of edges) e.moveTo(to);
  const parents = new Set<BlockNode>();
  for (const e of edges) if (e.parent instanceof BlockNode) parents.add(e.parent);
  for (const p of parents) p.refreshLimits();
}

/**
 * Replace `from` by `to` in the graph (QEMU's bdrv_replace_node): under drain, every parent
 * edge of `from` moves to `to` (BlockBackends included), except edges that must stay: a
 * job's own edges (`stayAtNode`) and edges that lie below `to`, which would make a loop
 * (when `to`'s backing is `from`, as after an external snapshot, that edge keeps pointing
 * at `from`). Returns the edges that moved. `from` stays open: its caller closes it when it
 * has no parents left.
 */
export async function replaceNode(from: BlockNode, to: BlockNode): Promise<ChildEdge[]> {
  if (from === to) throw invalidArgument(`Cannot replace '${from.filename}' by itself`);
  checkUsable(from, 'Node');
  checkUsable(to, 'Replacement node');
  return drained([from, to], () => {
    const moving = from.parents.filter((e) => !e.stayAtNode && !inSubtree(to, e));
    moveEdges(moving, to);
    return moving;
  });
}

/** Point one edge at another node, under drain (QEMU's bdrv_replace_child_bs). */
export async function replaceChild(edge: ChildEdge, to: BlockNode): Promise<void> {
  const from = edge.node;
  if (from === to) return;
  checkUsable(to, 'Replacement node');
  const parent = edge.parent;
  if (parent instanceof BlockNode && reaches(to, parent)) {
    throw invalidArgument(`Cannot make '${to.filename}' a child of '${parent.filename}': it would create a loop`);
  }
  await drained([from, to], () => moveEdges([edge], to));
}

/**
 * Set or drop `node`'s backing child in the open graph (QEMU's bdrv_set_backing_hd), under
 * drain; stream completion and commit of an intermediate image use it. The image header is
 * not touched: that is `node.changeBackingFile()`.
 */
export async function setBacking(node: BlockNode, backing: BlockNode | null): Promise<void> {
  const children = node.driver.children;
  if (children.backing === undefined) {
    throw invalidArgument(`'${node.filename}': format '${node.driver.driverName}' has no backing file`);
  }
  if (backing) {
    checkUsable(backing, 'Backing node');
    if (reaches(backing, node)) {
      throw invalidArgument(`Cannot make '${backing.filename}' the backing file of '${node.filename}': it would create a loop`);
    }
  }
  const old = children.backing;
  const drainSet = [node, ...(old ? [old.node] : []), ...(backing ? [backing] : [])];
  await drained(drainSet, () => {
    if (old && backing) {
      moveEdges([old], backing);
      return;
    }
    if (old) old.detach();
    children.backing = backing ? new ChildEdge('backing', backing) : null;
    children.backing?.attach(node);
    node.refreshLimits();
  });
}

/** Does `from` reach `target` going down (or is it `target`)? */
function reaches(from: BlockNode, target: BlockNode): boolean {
  const seen = new Set<BlockNode>();
  const stack = [from];
  while (stack.length > 0) {
    const n = stack.pop()!;
    if (n === target) return true;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const c of n.children) stack.push(c.node);
  }
  return false;
}

/**
 * Put `filter` (a filter node already opened on `below`) between `below` and all of its
 * parents (QEMU's bdrv_insert_node; bdrv_cbw_append). The filter's own edge stays on `below`.
 */
export async function insertFilter(below: BlockNode, filter: BlockNode): Promise<void> {
  if (!filter.isFilter) throw invalidArgument(`'${filter.filename}' is not a filter`);
  if (filter.filtered !== below) {
    throw invalidArgument(`Filter '${filter.filename}' must be opened on '${below.filename}' before it is inserted`);
  }
  if (filter.parents.length > 0) throw invalidArgument(`Filter '${filter.filename}' is already in use`);
  await replaceNode(below, filter);
}

/**
 * Take `filter` out of the graph (QEMU's bdrv_drop_filter; bdrv_cbw_drop): its parents move
 * to its child, then the filter is detached from the child and closed. The child stays open
 * even when nothing uses it any more; it is returned so the caller can close it then.
 */
export async function dropFilter(filter: BlockNode): Promise<BlockNode> {
  const below = filter.filtered;
  if (!filter.isFilter || !below) throw invalidArgument(`'${filter.filename}' is not a filter`);
  await drained([filter, below], async () => {
    moveEdges(filter.parents.filter((e) => !e.stayAtNode), below);
    for (const e of filter.children) e.detach();
    below.refreshLimits();
  });
  await filter.close();
  return below;
}

/**
 * Put `overlay` on top of `top` (QEMU's bdrv_append: the graph half of an external
 * snapshot): `overlay`'s backing becomes `top`, then every parent of `top` moves to
 * `overlay`, in one drained section. The backing edge just made stays on `top` (it lies
 * below `overlay`). The overlay's header is the caller's (changeBackingFile).
 */
export async function appendNode(top: BlockNode, overlay: BlockNode): Promise<void> {
  await drained([top, overlay], async () => {
    await setBacking(overlay, top);
    await replaceNode(top, overlay);
  });
}
