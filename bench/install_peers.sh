#!/usr/bin/env bash
# Debian's Orthanc, the second DICOM peer of `make bench` (bench/run_all.py). Installed for the benchmark only,
# never started as a service: the driver runs it on a temporary directory and free ports with its own JSON
# config. Failure is not fatal; the driver then prints "not installed" on Orthanc's row.
set -u
command -v Orthanc >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || exit 0
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  # Keep the package's init script from starting a system Orthanc on 4242/8042 during the install.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
fi
echo "bench: installing Debian's orthanc (DICOM peer)"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc) \
  >/dev/null 2>&1 || echo "bench: orthanc could not be installed; its rows will say so"
[ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d
exit 0
