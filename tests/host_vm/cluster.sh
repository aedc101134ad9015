#!/bin/sh
# cluster.sh - a multipath Linux host on a three-server cluster, run inside the
# nvme-host-vm guest by tests/host_vm_cluster.rs. The host connects to every server's
# portal; the kernel's native multipath makes one block device of the volume's three paths
# (ANA: one optimized, two inaccessible). fio writes and verifies while the test kills the
# primary's server: the leader promotes a replica, its path turns optimized, and fio sees
# no I/O error and its verify passes. The killed server then returns, is rebuilt, and the
# volume is fully protected again. The same with a primary stopped (SIGSTOP) past its
# lease and resumed, then with a planned move (the primary's server disabled).
#
# Environment: NQN, PORTS (the three servers' NVMe/TCP ports), NSID (the volume's).
set -eu

. /mnt/host/lib.sh

# --ctrl-loss-tmo -1: a path whose server is down is retried until it returns (a killed
# server that comes back may become the primary of a planned move later).
for p in $PORTS; do
    nvme connect -t tcp -n "$NQN" -a $T -s "$p" --nr-io-queues 1 \
        --reconnect-delay 1 --ctrl-loss-tmo -1 || fail "connect to port $p"
done
wait_ns "$NSID" 300 || fail "volume (nsid $NSID) did not appear"
DEV=$(blockdev "$NSID")

# path_states: "<port> <ana state>" per live path of the volume's multipath device.
path_states() {
    for p in /sys/block/"$(basename "$DEV")"/device/../nvme*c*n*/ana_state \
             /sys/block/nvme*c*n*/ana_state; do
        [ -e "$p" ] || continue
        d=$(dirname "$p")
        [ "$(cat "$d/nsid" 2>/dev/null)" = "$NSID" ] || continue
        ctrl=$(basename "$(readlink -f "$d/device")")
        # Only live controllers: a dead server's path keeps its last ANA state.
        [ "$(cat "/sys/class/nvme/$ctrl/state" 2>/dev/null)" = live ] || continue
        port=$(sed -n 's/.*trsvcid=\([0-9]*\).*/\1/p' "/sys/class/nvme/$ctrl/address")
        echo "$port $(cat "$p")"
    done | sort -u
}

# optimized_port TENTHS: the port of the one optimized path (waits for exactly one).
optimized_port() {
    n=0
    while :; do
        o=$(path_states | awk '$2 == "optimized" {print $1}')
        [ "$(echo "$o" | grep -c .)" = 1 ] && { echo "$o"; return 0; }
        n=$((n + 1)); [ $n -le "$1" ] || return 1
        sleep 0.1
    done
}

PATHS=$(path_states)
[ "$(echo "$PATHS" | grep -c .)" = 3 ] || { echo "$PATHS"; fail "expected three paths"; }
BEFORE=$(optimized_port 300) || { path_states; fail "no single optimized path"; }
[ "$(echo "$PATHS" | grep -c inaccessible)" = 2 ] || { echo "$PATHS"; fail "replicas not inaccessible"; }
ok "multipath-one-optimized-two-inaccessible $DEV optimized=$BEFORE"

fio --name=fo --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=24m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never --output-format=terse >/tmp/fio.out 2>&1 &
FIO=$!
( sleep 240; kill $FIO 2>/dev/null ) &
sleep 2
ask_host "kill-primary"
wait $FIO || { cat /tmp/fio.out; path_states; fail "fio across the primary's death"; }
ok "fio-verify-across-primary-kill"

AFTER=$(optimized_port 600) || { path_states; fail "no optimized path after failover"; }
[ "$AFTER" != "$BEFORE" ] || fail "the dead primary's path is still the optimized one"
ok "failover-path-optimized $AFTER"

ask_host "check-degraded"
# The killed server returns as a replica and is rebuilt; the data still verifies.
ask_host "restart-killed-and-wait-protected"
fio --name=fo --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=24m --verify=crc32c --verify_only --verify_fatal=1 \
    --eta=never --output-format=terse >/tmp/fio2.out 2>&1 || { cat /tmp/fio2.out; fail "verify after the rebuild"; }
ok "verify-after-rebuild"

# A hung primary: its server is stopped (SIGSTOP) while fio writes, past its lease, until
# a replica took over; then it resumes. I/O on its path stalls until the kernel gives up on
# it and retries on the new optimized path; the resumed server acknowledges nothing (its
# replicas refuse its epoch), so fio sees no error and its verify passes.
BEFORE=$(optimized_port 300) || { path_states; fail "no single optimized path"; }
fio --name=st --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=8m --offset=24m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never --output-format=terse >/tmp/fio4.out 2>&1 &
FIO=$!
( sleep 300; kill $FIO 2>/dev/null ) &
sleep 2
ask_host "stop-primary"
wait $FIO || { cat /tmp/fio4.out; path_states; fail "fio across the primary's stop"; }
AFTER=$(optimized_port 600) || { path_states; fail "no optimized path after the takeover"; }
[ "$AFTER" != "$BEFORE" ] || fail "the stopped primary's path is still the optimized one"
ok "fio-verify-across-primary-stop $BEFORE->$AFTER"
ask_host "wait-protected-after-stop"

# A planned move: the primary's server is disabled while fio writes; the volume is handed
# over to a replica, fio sees no error, and protection returns (the old primary is rebuilt).
BEFORE=$(optimized_port 300) || { path_states; fail "no single optimized path"; }
fio --name=mv --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=24m --offset=32m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never --output-format=terse >/tmp/fio3.out 2>&1 &
FIO=$!
( sleep 240; kill $FIO 2>/dev/null ) &
sleep 2
ask_host "disable-primary"
wait $FIO || { cat /tmp/fio3.out; path_states; fail "fio across the planned move"; }
AFTER=$(optimized_port 600) || { path_states; fail "no optimized path after the move"; }
[ "$AFTER" != "$BEFORE" ] || fail "the disabled server's path is still the optimized one"
ok "fio-verify-across-disable $BEFORE->$AFTER"
ask_host "wait-protected"
nvme disconnect -n "$NQN" >/dev/null || fail "disconnect"
ok "disconnect"
echo "ALL-CHECKS-PASSED"
