{
  "variables": {
    # The rbd addon needs librbd-dev; without it vdisk builds and runs, minus the rbd driver.
    # VDISK_NO_RBD=1 (or a failed rbd build: scripts/build-native.js) leaves it out.
    "vdisk_rbd%": "<!(node -e \"const c=require('child_process');process.stdout.write(process.env.VDISK_NO_RBD==='1'?'0':c.spawnSync('cc',['-E','-x','c','-'],{input:'#include <rbd/librbd.h>\\n'}).status===0?'1':'0')\")"
  },
  "targets": [
    {
      "target_name": "vdisk_native",
      "sources": ["native/vdisk_native.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ],
  "conditions": [
    ["vdisk_rbd==1", {
      "targets": [
        {
          "target_name": "vdisk_rbd",
          "sources": ["native/vdisk_rbd.c"],
          "cflags": ["-Wall", "-Wextra", "-O2"],
          "defines": ["NAPI_VERSION=8"],
          "libraries": ["-lrbd", "-lrados"]
        }
      ]
    }]
  ]
}
