#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests/cluster (`make test-cluster`). Needs root and apt.
#
#   tests/cluster/cluster.sh run CMD...   bring the cluster up, run CMD with SLURM_CONF set, tear it all down
#   tests/cluster/cluster.sh up DIR       bring it up with its state in DIR (a new folder); prints the env to export
#   tests/cluster/cluster.sh down DIR     tear down what `up DIR` started
#
# Two network namespaces (tl-n1 10.77.0.2, tl-n2 10.77.0.3) joined by the bridge tl-br0 (10.77.0.1) are two
# hosts with their own addresses and hostnames (n1, n2); slurmctld runs on this machine at 10.77.0.1, one slurmd
# in each namespace, munged with its own key and socket. Everything the cluster writes lives in one folder
# (/tmp/tl-slurm.XXXXXX); only addresses on the bridge are used. A previous run that crashed before tearing
# down is cleared first: its namespaces, bridge and daemons, all found by these names.
# Pitfalls this follows: ../shared/notes/slurm-two-hosts.md (nsenter, not `ip netns exec`; hostnames in a
# bind-mounted hosts file; GLOO_SOCKET_IFNAME=eth0 for jobs).
set -euo pipefail

PREFIX=tl-slurm.
BRIDGE=tl-br0
NODES=(n1 n2)
declare -A ADDR=([n1]=10.77.0.2 [n2]=10.77.0.3)
HEAD_ADDR=10.77.0.1
CTLD_PORT=16817
SLURMD_PORT=16818

log() { echo "cluster: $*" >&2; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || { log "needs root to install slurmctld slurmd slurm-client munge"; exit 2; }
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

# Processes of ours: the namespaces' (slurmd and its jobs), and slurmctld/munged started with a state folder of ours.
ours() {
    local dir=${1:-/tmp/$PREFIX}  # a folder, or every folder of ours
    for n in "${NODES[@]}"; do ip netns pids "tl-$n" 2>/dev/null || true; done
    for p in /proc/[0-9]*; do
        local pid=${p#/proc/} comm
        [ "$pid" = "$$" ] && continue
        comm=$(cat "$p/comm" 2>/dev/null) || continue  # gone meanwhile
        case "$comm" in
            slurmctld | munged | slurmstepd | slurmd)
                if { tr '\0' '\n' <"$p/cmdline" | grep -qF "$dir"; } 2>/dev/null ||
                    { tr '\0' '\n' <"$p/environ" | grep -qF "SLURM_CONF=$dir"; } 2>/dev/null; then
                    echo "$pid"
                fi
                ;;
        esac
    done
    return 0
}

stop_pids() {  # TERM, then KILL what is left after 5 s
    local pids
    pids=$(ours "$@" | sort -u | tr '\n' ' ')
    [ -z "${pids// /}" ] && return 0
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
        pids=$(for p in $pids; do [ ! -d "/proc/$p" ] || echo "$p"; done | tr '\n' ' ')
        [ -z "${pids// /}" ] && return 0
        sleep 0.1
    done
    kill -KILL $pids 2>/dev/null || true
}

remove_network() {
    for n in "${NODES[@]}"; do ip netns del "tl-$n" 2>/dev/null || true; ip link del "tl-$n-h" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
}

down() {  # best effort, whatever state things are in: every step runs
    set +e
    local dir=$1
    if [ -f "$dir/slurm.conf" ]; then
        SLURM_CONF=$dir/slurm.conf timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    fi
    stop_pids "$dir"
    remove_network
    case "$dir" in /tmp/$PREFIX*) rm -rf "$dir" ;; esac
}

clear_leftovers() {  # from a run that crashed before tearing down
    set +e
    local found=0
    ip link show "$BRIDGE" >/dev/null 2>&1 && found=1
    for n in "${NODES[@]}"; do [ -e "/run/netns/tl-$n" ] && found=1; done
    [ -n "$(ours)" ] && found=1
    if [ "$found" = 1 ]; then log "clearing what a previous run left (namespaces, bridge, daemons)"; fi
    stop_pids
    remove_network
    for old in /tmp/$PREFIX*; do [ ! -d "$old" ] || rm -rf "$old"; done
    set -e
    return 0
}

network() {
    ip link add "$BRIDGE" type bridge
    ip addr add "$HEAD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for n in "${NODES[@]}"; do
        ip netns add "tl-$n"
        ip link add "tl-$n-h" type veth peer name eth0 netns "tl-$n"
        ip link set "tl-$n-h" master "$BRIDGE"
        ip link set "tl-$n-h" up
        ip -n "tl-$n" addr add "${ADDR[$n]}/24" dev eth0
        ip -n "tl-$n" link set eth0 up
        ip -n "tl-$n" link set lo up
    done
}

config() {
    local dir=$1 host
    host=$(hostname)
    {
        echo "127.0.0.1 localhost"
        echo "$HEAD_ADDR $host"
        for n in "${NODES[@]}"; do echo "${ADDR[$n]} $n"; done
    } >"$dir/hosts"
    cat >"$dir/slurm.conf" <<CONF
ClusterName=tl
SlurmctldHost=$host($HEAD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
NodeName=n1 NodeHostname=n1 NodeAddr=${ADDR[n1]} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=n2 NodeAddr=${ADDR[n2]} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    local dir=$1
    mkdir -p "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$dir/munge/munge.key"
    chown -R munge:munge "$dir/munge"
    chmod 0755 "$dir/munge"  # munged: the socket folder must be searchable by all
    runuser -u munge -- /usr/sbin/munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
    munge -n --socket="$dir/munge/munge.socket" | unmunge --socket="$dir/munge/munge.socket" >/dev/null
}

up() {
    local dir=$1
    [ "$(id -u)" -eq 0 ] || { log "needs root (network namespaces, munged, slurmd)"; exit 2; }
    install_packages
    clear_leftovers
    mkdir -p "$dir/state"
    chmod 0755 "$dir"
    network
    config "$dir"
    start_munge "$dir"
    export SLURM_CONF=$dir/slurm.conf
    setsid slurmctld -D -i -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 </dev/null &
    for n in "${NODES[@]}"; do
        setsid nsenter --net="/run/netns/tl-$n" unshare --uts --mount sh -c \
            "hostname $n; mount --bind '$dir/hosts' /etc/hosts; exec slurmd -D -N $n -f '$dir/slurm.conf'" \
            >"$dir/slurmd-$n.out" 2>&1 </dev/null &
    done
    for _ in $(seq 300); do
        if [ "$(sinfo -h -N -t idle 2>/dev/null | wc -l)" = "${#NODES[@]}" ]; then
            log "up: ${NODES[*]} idle (SLURM_CONF=$SLURM_CONF)"
            return 0
        fi
        sleep 0.2
    done
    log "the nodes did not become idle within 60 s:"
    sinfo -N >&2 || true
    tail -n 20 "$dir"/*.log "$dir"/*.out >&2 || true
    return 1
}

case "${1:-}" in
    up)
        up "$2"
        echo "export SLURM_CONF=$2/slurm.conf TUNELAB_CLUSTER=$2"
        ;;
    down) down "$2" ;;
    run)
        shift
        dir=$(mktemp -d "/tmp/${PREFIX}XXXXXX")
        trap 'down "$dir"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        up "$dir"
        export SLURM_CONF=$dir/slurm.conf TUNELAB_CLUSTER=$dir
        status=0
        "$@" || status=$?
        exit $status
        ;;
    *)
        sed -n '2,8p' "$0"
        exit 2
        ;;
esac
