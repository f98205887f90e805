#!/usr/bin/env bash
# Installs the system services the tests run against: a real Redis server, headless Chromium for
# the dashboard's Jobs page test, Prometheus's checkers for the deployment files, and iproute2 for
# the multi-host tests (network namespaces).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# promtool and amtool check the Prometheus and Alertmanager files in deploy/
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
# `ip netns` builds the hosts of tests/multihost
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# the package starts a system-wide server on 6379; the tests start their own on free ports
redis-server --version
chromium --version 2>/dev/null
