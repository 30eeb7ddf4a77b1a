{
  "targets": [
    {
      "target_name": "vdisk_native",
      "sources": ["native/vdisk_native.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
