#!/bin/sh
# guest.sh - evstor datapath host-VM scenarios, run inside the nvme-host-vm guest by
# tests/host_vm.rs. Talks to the test on the host through files in /mnt/host (9p):
# the guest creates REQ-<name>, the host acts and creates DONE-<name>.
# Every passed check prints "CHECK-OK <name>"; the first failure exits non-zero.
#
# Environment: NQN, TARGET_PORT, DISC_PORT, OTHER_HOSTNQN (an NQN outside the ACL).
set -eu

. /mnt/host/lib.sh    # T, SH, fail, ok, ask_host, blockdev, wait_ns (tests/host_vm/lib.sh)

step() { echo; echo "=== $*"; }
ctrldev() {
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c" ] || continue
        [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN" ] && { echo "/dev/$(basename "$c")"; return 0; }
    done
    return 1
}
zeroes() {      # zeroes DEV SKIP_4K COUNT_4K: succeed if that range reads as zeroes
    nz=$(dd if="$1" bs=4k skip="$2" count="$3" iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
    [ "$nz" -eq 0 ]
}
fio_verify() {  # fio_verify NAME DEV RW BS SIZE
    fio --name="$1" --filename="$2" --ioengine=libaio --direct=1 --rw="$3" --bs="$4" \
        --iodepth=16 --size="$5" --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --eta=never --output-format=terse >/tmp/fio-"$1".out 2>&1 ||
        { cat /tmp/fio-"$1".out; fail "fio $1"; }
}

echo "host NQN: $(cat /etc/nvme/hostnqn)"

step "discover on the discovery port $DISC_PORT and on the I/O port $TARGET_PORT"
for port in "$DISC_PORT" "$TARGET_PORT"; do
    nvme discover -t tcp -a $T -s "$port" -o json >/tmp/disc.json || fail "discover :$port"
    jq -e --arg n "$NQN" --arg p "$TARGET_PORT" '[.records[] | select(.subnqn == $n and
        .trtype == "tcp" and .adrfam == "ipv4" and .trsvcid == $p)] | length == 1' /tmp/disc.json \
        >/dev/null || { cat /tmp/disc.json; fail "discovery log :$port"; }
    ok "discover-$port"
done

step "connect --nr-io-queues 2"
dmesg -c >/dev/null
nvme connect -t tcp -n "$NQN" -a $T -s "$TARGET_PORT" --nr-io-queues 2 \
    --reconnect-delay 1 --ctrl-loss-tmo 120 || fail "connect"
wait_ns 1 100 || fail "namespace 1 did not appear"
DEV=$(blockdev 1); CTRL=$(ctrldev)
dmesg | grep -q "mapped 2/0/0 default/read/poll queues" || { dmesg; fail "expected 2 I/O queues"; }
ok "connect-2-queues $CTRL $DEV"

step "nvme list / id-ctrl / id-ns / smart-log / ana-log / error-log / fw-log"
nvme list
nvme id-ctrl "$CTRL" -o json >/tmp/idc.json || fail "id-ctrl"
jq -e --arg n "$NQN" '.subnqn == $n and .nn == 65536 and .mdts == 11' /tmp/idc.json >/dev/null ||
    { cat /tmp/idc.json; fail "id-ctrl fields"; }
ok id-ctrl
nvme id-ns "$DEV" -o json >/tmp/idn.json || fail "id-ns"
jq -e '.nsze == 16384 and .lbafs[0].ds == 12' /tmp/idn.json >/dev/null ||
    { cat /tmp/idn.json; fail "id-ns fields"; }
ok id-ns
nvme ns-descs "$DEV" || fail "ns-descs"
ok ns-descs
nvme smart-log "$CTRL" || fail "smart-log"
ok smart-log
nvme ana-log "$CTRL" -o json >/tmp/ana.json || fail "ana-log"
jq -e '.ana_log[0].state == "optimized"' /tmp/ana.json >/dev/null ||
    grep -q optimized /tmp/ana.json || { cat /tmp/ana.json; fail "ana-log content"; }
ok ana-log
nvme error-log "$CTRL" -e 1 >/dev/null || fail "error-log"
nvme fw-log "$CTRL" || fail "fw-log"
nvme get-feature "$CTRL" -f 7 || fail "get-feature number of queues"
ok logs-and-features

step "fio 4k randwrite verify=crc32c, 128k sequential write + verify"
fio_verify rand4k "$DEV" randwrite 4k 8M
ok fio-4k-randwrite-verify
fio_verify seq128k "$DEV" write 128k 16M
ok fio-128k-seqwrite-verify

step "blkdiscard and write-zeroes read back as zeroes"
zeroes "$DEV" 0 256 && fail "range was already zero before discard"
blkdiscard -o 0 -l 1048576 "$DEV" || fail "blkdiscard"
zeroes "$DEV" 0 256 || fail "discarded range does not read as zeroes"
ok blkdiscard
zeroes "$DEV" 512 8 && fail "range was already zero before write-zeroes"
nvme write-zeroes "$DEV" -s 512 -c 7 || fail "write-zeroes"
zeroes "$DEV" 512 8 || fail "write-zeroes range not zero"
ok write-zeroes

step "MDTS reaches the host; passthrough commands of 1, 256 and 1025 blocks round-trip"
hw=$(cat /sys/block/"$(basename "$DEV")"/queue/max_hw_sectors_kb)
[ "$hw" -ge 4100 ] || fail "max_hw_sectors_kb is $hw: a 1025-block passthrough cannot fit"
for n in 1 256 1025; do
    dd if=/dev/urandom of=/tmp/pt.in bs=4096 count="$n" 2>/dev/null
    nvme write "$DEV" -s 8192 -c $((n - 1)) -z $((n * 4096)) -d /tmp/pt.in >/dev/null ||
        fail "passthrough write of $n blocks"
    nvme read "$DEV" -s 8192 -c $((n - 1)) -z $((n * 4096)) -d /tmp/pt.out >/dev/null ||
        fail "passthrough read of $n blocks"
    cmp /tmp/pt.in /tmp/pt.out || fail "passthrough of $n blocks did not round-trip"
done
ok "passthrough-large max_hw_sectors_kb=$hw"

step "a namespace published after connect appears"
ask_host add-ns2
# Only the target's Namespace Attribute Changed AEN makes the kernel rescan by itself; no
# manual ns-rescan here, or a lost AEN would pass unnoticed.
wait_ns 2 200 || fail "namespace 2 did not appear: no namespace-changed AEN"
ok "ns-added-aen"

step "an ACL change hides a namespace from a live controller"
ask_host hide-ns2
n=0
while blockdev 2 >/dev/null; do
    n=$((n + 1)); [ $n -le 200 ] || fail "namespace 2 still visible after its ACL excluded us"
    sleep 0.1
done
ok ns-removed-by-acl

step "data survives a target restart; the kernel reconnects by itself"
dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null
dd if=/tmp/pat of="$DEV" bs=64k seek=200 oflag=direct conv=fsync 2>/dev/null || fail "write pattern"
SUM=$(md5sum </tmp/pat)
ask_host restart
n=0
until [ "$(cat /sys/class/nvme/$(basename "$CTRL")/state)" = live ] && blockdev 1 >/dev/null; do
    n=$((n + 1)); [ $n -le 300 ] || fail "controller did not reconnect after the restart"
    sleep 0.1
done
dmesg | grep -q "Successfully reconnected" || { dmesg | tail -n 20; fail "no kernel reconnect seen"; }
[ "$(dd if="$DEV" bs=64k skip=200 count=16 iflag=direct 2>/dev/null | md5sum)" = "$SUM" ] ||
    fail "data changed across restart"
ok data-survives-restart
nvme disconnect -n "$NQN" || fail "disconnect"
blockdev 1 >/dev/null && fail "namespace still present after disconnect"
ok disconnect

step "connect with header and data digests"
nvme connect -t tcp -n "$NQN" -a $T -s "$TARGET_PORT" --hdr-digest --data-digest || fail "connect -g -G"
wait_ns 1 100 || fail "namespace 1 did not come back"
DEV=$(blockdev 1)
[ "$(dd if="$DEV" bs=64k skip=200 count=16 iflag=direct 2>/dev/null | md5sum)" = "$SUM" ] ||
    fail "data differs on the digest connection"
fio_verify digest4k "$DEV" randwrite 4k 4M
ok fio-with-digests
nvme disconnect -n "$NQN" || fail "disconnect"

step "a host NQN outside the ACL sees no namespace"
nvme connect -t tcp -n "$NQN" -a $T -s "$TARGET_PORT" -q "$OTHER_HOSTNQN" || fail "connect as other host"
c=0; until ctrldev >/dev/null; do c=$((c + 1)); [ $c -le 50 ] || fail "no controller"; sleep 0.1; done
sleep 2
blockdev 1 >/dev/null && fail "namespace 1 visible to a host outside the ACL"
blockdev 2 >/dev/null && fail "namespace 2 visible to a host outside the ACL"
[ -z "$(nvme list-ns "$(ctrldev)" 2>/dev/null)" ] || { nvme list-ns "$(ctrldev)"; fail "list-ns not empty"; }
ok acl-hides-namespaces
nvme disconnect -n "$NQN" || fail "disconnect other host"
ok disconnect-all
echo "--- kernel messages from nvme (for the record)"
dmesg | grep -iE "nvme|tcp" | grep -viE "pci|nvme_core|loaded" | tail -n 30 || true
echo "ALL-CHECKS-PASSED"
