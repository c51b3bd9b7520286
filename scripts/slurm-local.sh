#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the tests and for
# trying `simfreeze compare --slurm` without a cluster: slurmctld and slurmd
# on localhost, 2 CPUs, proctrack/linuxproc, no cgroups, munge for
# authentication, every file (configuration, state, spool, logs, munge key
# and socket) under one directory.
#
#   scripts/slurm-local.sh install        apt-get install slurm-wlm and munge if missing
#   scripts/slurm-local.sh start DIR      start the cluster in DIR (created), wait until it
#                                         takes jobs, print `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm-local.sh stop DIR       stop it (DIR is left for the logs)
#
# With SLURM_CONF exported, sbatch, squeue, scancel and sacct talk to it.
# The daemons run as the current user (root in CI, where setup.sh installs
# the packages). SIMFREEZE_SLURM_CPUS sets the node's CPUs (default 2).
set -euo pipefail

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        echo "slurm-local: slurm-wlm and munge are missing and apt-get is not available" >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "slurm-local: installing slurm-wlm and munge (apt)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir="$1"
    install
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
    chmod 700 "$dir/munge"
    # munge: a fresh key, its own socket.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    local host user cpus
    host="$(hostname -s)"
    user="$(id -un)"
    cpus="${SIMFREEZE_SLURM_CPUS:-2}"
    cat >"$dir/slurm.conf" <<CONF
ClusterName=simfreeze
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    local i
    for i in $(seq 1 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^idle'; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm-local: the cluster did not come up within 30 s; logs:" >&2
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" "$dir/munge/munged.log" >&2 || true
    stop "$dir"
    return 1
}

stop() {
    local dir="$1" f pid
    for f in slurmd.pid slurmctld.pid munge/munged.pid; do
        if [ -f "$dir/$f" ]; then
            pid="$(cat "$dir/$f")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 20); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.25
            done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$f"
        fi
    done
}

case "${1:-}" in
install) install ;;
start) start "${2:?usage: slurm-local.sh start DIR}" ;;
stop) stop "${2:?usage: slurm-local.sh stop DIR}" ;;
*)
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
