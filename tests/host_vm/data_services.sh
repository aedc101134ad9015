#!/bin/sh
# data_services.sh - the block store's data services seen from a stock Linux host, run inside
# the nvme-host-vm guest by tests/host_vm_data_services.rs: write, snapshot, overwrite, clone,
# diff, rollback and grow on volume A; a compressed volume C; QoS on volume Q beside an
# unlimited volume U. Data is checked with fio's verify (crc32c headers per block).
#
# Environment: NQN, TARGET_PORT, NS_A, NS_C, NS_Q, NS_U (namespace ids), QOS_IOPS.
set -eu
. /mnt/host/lib.sh

# fio_verify NAME DEV ARGS...: a verified write job (its data is re-checkable with verify_only).
fio_job() {
    name=$1; dev=$2; shift 2
    fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 --verify=crc32c \
        --verify_fatal=1 --eta=never --output-format=terse "$@" >"/tmp/$name.out" 2>&1
}

nvme connect -t tcp -n "$NQN" -a $T -s "$TARGET_PORT" --nr-io-queues 2 \
    --reconnect-delay 1 --ctrl-loss-tmo 120 || fail "connect"
for ns in "$NS_A" "$NS_C" "$NS_Q" "$NS_U"; do
    wait_ns "$ns" 100 || fail "namespace $ns did not appear"
done
A=$(blockdev "$NS_A")

# P1: 16 MiB of verified data on A; the snapshot S1 freezes it.
P1="--rw=write --bs=64k --size=16m --randseed=11"
fio_job p1 "$A" $P1 --do_verify=1 || { cat /tmp/p1.out; fail "p1 write"; }
ok "write-verify"
ask_host "snapshot-s1"

# P2 overwrites exactly blocks 1024..1279 (4 MiB + 1 MiB, every 4k block once, random order).
P2="--rw=randwrite --bs=4k --offset=4m --size=1m --randseed=22"
fio_job p2 "$A" $P2 --do_verify=1 || { cat /tmp/p2.out; fail "p2 overwrite"; }
ok "overwrite-verify"
dd if="$A" of=/tmp/a-region bs=1M skip=4 count=1 iflag=direct 2>/dev/null

# The host takes S2, checks the diff S1..S2 lists exactly the overwritten blocks, and clones
# a volume K from S1.
ask_host "snapshot-s2-diff-clone"
NS_K=$(cat "$SH/VAL-snapshot-s2-diff-clone")
wait_ns "$NS_K" 150 || fail "clone K (nsid $NS_K) did not appear"
K=$(blockdev "$NS_K")
fio_job p1v "$K" $P1 --verify_only=1 || { cat /tmp/p1v.out; fail "clone K does not hold S1's data"; }
fio_job p2v "$A" $P2 --verify_only=1 || { cat /tmp/p2v.out; fail "A lost the overwrite"; }
dd if="$K" of=/tmp/k-region bs=1M skip=4 count=1 iflag=direct 2>/dev/null
cmp -s /tmp/a-region /tmp/k-region && fail "clone K shows A's new data"
ok "clone-holds-snapshot-while-volume-holds-new-data"

# Writing to the clone does not touch A or S1.
fio_job k1 "$K" --rw=write --bs=64k --size=2m --randseed=33 --do_verify=1 || fail "clone write"
fio_job p2v2 "$A" $P2 --verify_only=1 || fail "a write to the clone changed A"
ok "clone-is-independent"

# Rollback A to S1: the namespace leaves while it runs and comes back with S1's data.
ask_host "rollback-a-s1"
wait_ns "$NS_A" 150 || fail "A did not come back after the rollback"
A=$(blockdev "$NS_A")
fio_job p1r "$A" $P1 --verify_only=1 || { cat /tmp/p1r.out; fail "A after rollback != S1"; }
ok "rollback-restores-snapshot"

# Grow A through the API: the host sees the new capacity without reconnecting.
before=$(size_of "$A")
ask_host "grow-a"
n=0
until [ "$(size_of "$(blockdev "$NS_A")")" -gt "$before" ]; do
    n=$((n + 1)); [ $n -le 150 ] || fail "A still $(size_of "$A") bytes after growing"
    sleep 0.1
done
ok "grow-visible-to-host $before -> $(size_of "$(blockdev "$NS_A")")"

# Compressed volume: compressible data verifies; the host checks the reported ratio.
C=$(blockdev "$NS_C")
# (fio fills verified buffers itself: a repeating pattern makes them compressible, and each
# 4 KiB block still carries fio's own header with the offset and a crc32c of the block.)
fio_job c1 "$C" --rw=write --bs=4k --size=16m --verify_pattern=0x5a5aa5a5 \
    --verify_interval=4096 --randseed=44 --do_verify=1 || { cat /tmp/c1.out; fail "compressed write"; }
ok "compressed-write-verify"
ask_host "compression-ratio"
ok "compression-ratio $(cat "$SH/VAL-compression-ratio")"

# QoS: Q is limited to QOS_IOPS reads per second, U is not. U alone, then both at once.
Q=$(blockdev "$NS_Q"); U=$(blockdev "$NS_U")
RR="--ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth=8 --time_based --runtime=10 --ramp_time=2 --size=32m"
# While U runs alone, the host scrapes /metrics twice and sees U's read counter move.
fio --name=u --filename="$U" $RR --output-format=json >"$SH/qos-alone.json" 2>/tmp/qa.err &
alone=$!
sleep 4
ask_host "metrics-during-fio"
wait $alone || fail "fio U alone"
[ "$(cat "$SH/VAL-metrics-during-fio")" -gt 0 ] || fail "U's reads did not move in /metrics during fio"
ok "metrics-move-during-fio $(cat "$SH/VAL-metrics-during-fio") reads in 2 s"
fio --name=q --filename="$Q" $RR --iodepth=32 --name=u --filename="$U" $RR --output-format=json \
    >"$SH/qos-both.json" 2>/tmp/qb.err || fail "fio Q and U"
ok "qos-measured"

nvme disconnect -n "$NQN" || fail "disconnect"
echo "ALL-CHECKS-PASSED"
