#!/bin/sh
# e2e.sh - end-to-end host scenario for `evstor serve`, run inside the nvme-host-vm guest by
# tests/host_vm_e2e.rs. Volumes are created through the REST API by the test on the host;
# the guest asks it to act through files in /mnt/host (REQ-<name> → DONE-<name>).
# Every passed check prints "CHECK-OK <name>"; the first failure exits non-zero.
#
# Environment: NQN (cluster subsystem NQN from GET /clusterinfo), TARGET_PORT, DISC_PORT.
set -eu

. /mnt/host/lib.sh

nvme discover -t tcp -a $T -s "$DISC_PORT" -o json >/tmp/disc.json || fail "discover"
jq -e --arg n "$NQN" '[.records[] | select(.subnqn == $n)] | length == 1' /tmp/disc.json \
    >/dev/null || { cat /tmp/disc.json; fail "discovery log lacks the cluster subsystem"; }
ok "discover-cluster-subsystem"

nvme connect -t tcp -n "$NQN" -a $T -s "$TARGET_PORT" --nr-io-queues 2 \
    --reconnect-delay 1 --ctrl-loss-tmo 120 || fail "connect"
wait_ns 1 100 || fail "volume v1 (nsid 1) did not appear"
DEV=$(blockdev 1)
[ "$(blockdev 2 || true)" = "" ] || fail "volume v2 (acl names another host) is visible"
ok "connect-sees-only-its-volumes $DEV"

fio --name=rw --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=16 --size=8m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never --output-format=terse >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "fio"; }
ok "fio-4k-randwrite-verify"

# A marker at 1 MiB that must survive an evstor restart.
head -c 4096 /dev/urandom > /tmp/marker
dd if=/tmp/marker of="$DEV" bs=4k seek=256 count=1 oflag=direct conv=fsync 2>/dev/null || fail "dd marker"

ask_host "check-connected"
wait_ns 3 150 || fail "volume v3 created after connect did not appear"
ok "volume-created-after-connect-appears"

ask_host "restart"
n=0
until dd if="$DEV" of=/tmp/back bs=4k skip=256 count=1 iflag=direct 2>/dev/null && cmp -s /tmp/marker /tmp/back; do
    n=$((n + 1)); [ $n -le 300 ] || fail "marker not readable after the evstor restart"
    sleep 0.2
done
ok "data-survives-evstor-restart"

ask_host "revoke-acl"
wait_gone 1 150 || fail "v1 still visible after its acl was set to ALLOW_NONE"
ok "acl-change-hides-volume"

nvme disconnect -n "$NQN" || fail "disconnect"
ok "disconnect"
echo "ALL-CHECKS-PASSED"
