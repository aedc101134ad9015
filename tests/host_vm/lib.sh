# lib.sh - helpers shared by the guest scripts of the host VM tests (sourced from the 9p
# share, where the Rust driver copies it). Environment: NQN (the cluster subsystem NQN).
# Every passed check prints "CHECK-OK <name>"; `fail` prints the reason and the kernel log.

T=10.0.2.2
SH=/mnt/host
fail() { echo "FAIL: $*"; dmesg | tail -n 30; exit 1; }
ok() { echo "CHECK-OK $*"; }

# ask_host NAME: asks the test on the host to act (REQ-NAME) and waits for DONE-NAME.
# A reply, if the host has one, is in $SH/VAL-NAME.
ask_host() {
    # Creating a file in the 9p share has failed once with "nonexistent directory" right
    # after the host removed the previous request file: retry briefly before giving up.
    n=0
    # `true`, not `:`: a failed redirection on a special builtin exits the whole shell.
    until true 2>/dev/null > "$SH/REQ-$1"; do
        n=$((n + 1)); [ $n -le 50 ] || fail "cannot create $SH/REQ-$1"
        sleep 0.1
    done
    n=0
    until [ -e "$SH/DONE-$1" ]; do
        n=$((n + 1)); [ $n -le 1800 ] || fail "host did not answer $1"
        sleep 0.1
    done
}

# blockdev NSID: the block device of namespace NSID of the cluster subsystem.
blockdev() {
    for d in /sys/block/nvme*n*; do
        [ -e "$d" ] || continue
        case "$(basename "$d")" in *c*) continue ;; esac
        [ "$(cat "$d/device/subsysnqn" 2>/dev/null)" = "$NQN" ] || continue
        [ "$(cat "$d/nsid" 2>/dev/null)" = "$1" ] && { echo "/dev/$(basename "$d")"; return 0; }
    done
    return 1
}

# wait_ns NSID TENTHS: waits for the namespace's block device to appear.
wait_ns() {
    n=0
    until blockdev "$1" >/dev/null; do
        n=$((n + 1)); [ $n -le "$2" ] || return 1
        sleep 0.1
    done
}

# wait_gone NSID TENTHS: waits for the namespace's block device to go away.
wait_gone() {
    n=0
    while blockdev "$1" >/dev/null; do
        n=$((n + 1)); [ $n -le "$2" ] || return 1
        sleep 0.1
    done
}

# size_of DEV: capacity in bytes as the kernel sees it.
size_of() {
    echo $(( $(cat /sys/block/"$(basename "$1")"/size) * 512 ))
}
