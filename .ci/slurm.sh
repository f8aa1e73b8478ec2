#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on this machine, for CI and for tests marked `slurm`.
#
# Run as root on Debian 12 (no systemd needed). Idempotent: when the daemons already run with the same
# configuration, a second call only checks the node and runs one trivial job (~2 s).
#
# Accounting (slurmdbd on a local MariaDB) is included: submitit polls `sacct` for job states, and without it
# a job that dies before writing its result (killed, out of memory) leaves the submitting process waiting
# forever instead of failing.
#
# Environment knobs:
#   SLURM_CI_PARTITION  partition name (default: debug; conf/hydra/launcher/slurm_local.yaml expects it)
#   SLURM_CI_WAIT_S     how long to wait for each daemon and for the test job (default: 60)
set -euo pipefail

PARTITION=${SLURM_CI_PARTITION:-debug}
WAIT_S=${SLURM_CI_WAIT_S:-60}
CLUSTER=ci
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

log() { printf '[slurm-ci] %s\n' "$*"; }
die() {
    printf '[slurm-ci] ERROR: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

install_packages() {
    local missing=() pkg policy t0
    for pkg in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == 'install ok installed' ]] || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "packages already installed: ${PACKAGES[*]}"
        return
    fi
    t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when apt does not know a package yet (a clean image has no lists).
    for pkg in "${missing[@]}"; do
        # Captured first: with pipefail, `apt-cache ... | grep -q` fails when grep closes the pipe early.
        policy=$(apt-cache policy "$pkg" 2>/dev/null || true)
        if [[ $policy != *"Candidate: "[0-9]* ]]; then
            log "apt-get update (apt knows no candidate for $pkg)"
            apt-get update -q >/dev/null || die "apt-get update failed"
            break
        fi
    done
    log "installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed"
    log "packages installed in $(since "$t0") s"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    local key=/etc/munge/munge.key i
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $key ]]; then
        log "creating munge key $key"
        dd if=/dev/urandom of=$key bs=1024 count=1 status=none
    fi
    # munged refuses a key that other users can read.
    chown munge:munge $key
    chmod 0400 $key
    if munge_works; then
        log "munged already running"
        return
    fi
    log "starting munged"
    # --force: a socket left behind by a killed munged would otherwise stop it from starting.
    runuser -u munge -- /usr/sbin/munged --force || die "munged failed to start; see /var/log/munge/munged.log"
    for ((i = 0; i < 50; i++)); do
        munge_works && return
        sleep 0.1
    done
    die "munged started but 'munge -n | unmunge' fails"
}

# Creates the accounting database user; sets DBD_PASS to its password.
start_mariadb() {
    if mariadb-admin --silent ping >/dev/null 2>&1; then
        log "mariadb already running"
    else
        log "starting mariadb"
        /etc/init.d/mariadb start >/dev/null || die "mariadb failed to start"
    fi
    # Reuse the password of an earlier run, so that slurmdbd.conf (and so slurmdbd) stays unchanged.
    DBD_PASS=$(sed -n 's/^StoragePass=//p' $DBD_CONF 2>/dev/null || true)
    [[ -n $DBD_PASS ]] || DBD_PASS=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    mariadb <<SQL || die "could not create the accounting database user"
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBD_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBD_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

render_dbd_conf() {
    cat <<CONF
# Written by .ci/slurm.sh. Rerun the script instead of editing this file.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=${RUN_DIR}/slurmdbd.pid
LogFile=${LOG_DIR}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=${DBD_PASS}
CONF
}

# The configuration, from this machine's name, CPU count and memory.
render_conf() {
    local node cpus mem_total real_mem
    node=$(hostname -s)
    cpus=$(nproc)
    mem_total=$(free -m | awk '/^Mem:/ { print $2 }')
    # slurmd drains a node that has less memory than configured: stay 5% below the total.
    real_mem=$((mem_total * 95 / 100))
    cat <<CONF
# Written by .ci/slurm.sh: a single-node cluster for CI. Rerun the script instead of editing this file.
ClusterName=${CLUSTER}
SlurmctldHost=${node}(127.0.0.1)
AuthType=auth/munge
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# No cgroups in a container: track processes by parent id and do not bind tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default, a job that asks for no memory would take the whole node and serialise an array.
DefMemPerCPU=512
# A restarted slurmd brings its node back instead of leaving it DOWN.
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

# Writes $2 to file $1 when it differs; returns 0 when it wrote.
write_if_changed() {
    local file=$1 content=$2 mode=$3
    [[ -f $file && $(cat "$file") == "$content" ]] && return 1
    log "writing $file"
    # Called as an `if` condition, where set -e is off: check the writes by hand.
    install -o slurm -g slurm -m "$mode" /dev/null "$file" || die "cannot create $file"
    printf '%s\n' "$content" >"$file" || die "cannot write $file"
}

# The pid file can vanish between the test and the read while a daemon exits.
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

stop_daemon() {
    local name=$1 pidfile=$RUN_DIR/$1.pid i
    pid_alive "$pidfile" || return 0
    log "stopping $name (configuration changed)"
    kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pidfile" || return 0
        sleep 0.1
    done
    die "$name did not stop"
}

start_daemon() {
    local name=$1 pidfile=$RUN_DIR/$1.pid
    shift
    if pid_alive "$pidfile"; then
        log "$name already running (pid $(cat "$pidfile"))"
        return
    fi
    log "starting $name $*"
    # All three daemonise themselves once their configuration is read.
    "/usr/sbin/$name" "$@" || die "$name failed to start; tail of $LOG_DIR/$name.log:
$(tail -n 20 "$LOG_DIR/$name.log" 2>/dev/null)"
}

wait_for_dbd() {
    local deadline=$((SECONDS + WAIT_S))
    until sacctmgr -n -P show cluster >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "slurmdbd not answering after ${WAIT_S} s; see $LOG_DIR/slurmdbd.log"
        sleep 0.5
    done
    # Registered before slurmctld starts, so that slurmctld's first connection is accepted.
    if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
        log "registering cluster '$CLUSTER' with slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
    fi
}

wait_for_node() {
    local node deadline=$((SECONDS + WAIT_S)) state="" resumed=0
    node=$(hostname -s)
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)
        case $state in
            idle | mixed | allocated | completing)
                log "node $node is $state"
                return
                ;;
            drained* | draining | down*)
                # Left over from an earlier configuration or a restart; safe on a dedicated CI node.
                if ((resumed == 0)); then
                    log "node is $state; resuming it"
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
    die "node not idle after ${WAIT_S} s (last state: ${state:-no answer from slurmctld})"
}

run_test_job() {
    local t0 out jid state="" deadline
    t0=$(now)
    out=$(mktemp /tmp/slurm-ci-job.XXXXXX)
    # The single quotes are meant: the job, not this script, expands $(hostname) and $SLURM_JOB_ID.
    # shellcheck disable=SC2016
    if ! jid=$(timeout "$WAIT_S" sbatch --wait --parsable -p "$PARTITION" -n 1 -c 1 --mem=64 -t 1 \
        -J ci-check -o "$out" --wrap 'echo "ran on $(hostname) as job $SLURM_JOB_ID"'); then
        cat "$out" >&2 || true
        die "trivial sbatch --wait job failed"
    fi
    log "test job: $(cat "$out") (sbatch --wait returned after $(since "$t0") s)"
    rm -f "$out"
    # slurmctld hands finished jobs to slurmdbd asynchronously.
    deadline=$((SECONDS + 20))
    until state=$(sacct -n -X -P -j "$jid" -o State 2>/dev/null) && [[ $state == COMPLETED ]]; do
        ((SECONDS < deadline)) || die "sacct does not list job $jid as COMPLETED (got '$state')"
        sleep 0.5
    done
    log "sacct: job $jid $state"
}

main() {
    local t_all t_start
    t_all=$(now)
    install_packages
    t_start=$(now)
    start_munge
    install -d -m 0755 $CONF_DIR
    install -d -o slurm -g slurm -m 0755 $STATE_DIR $SPOOL_DIR $LOG_DIR $RUN_DIR

    start_mariadb
    # Both files first: sacctmgr, used to wait for slurmdbd, reads slurm.conf too.
    local dbd_changed=0 conf_changed=0
    # slurmdbd.conf holds the database password: slurm-only (slurmdbd refuses anything laxer).
    write_if_changed $DBD_CONF "$(render_dbd_conf)" 0600 && dbd_changed=1
    write_if_changed $CONF "$(render_conf)" 0644 && conf_changed=1
    if ((dbd_changed)); then
        stop_daemon slurmdbd
    fi
    start_daemon slurmdbd
    wait_for_dbd
    if ((conf_changed)); then
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    # -c: a controller that is not running now died with an earlier machine or session, and the jobs in
    # its saved state died with it; restored, they hold the node as "allocated" and every new job waits.
    start_daemon slurmctld -c
    start_daemon slurmd
    wait_for_node
    log "daemons up in $(since "$t_start") s"
    run_test_job
    sinfo
    log "done in $(since "$t_all") s; partition '$PARTITION', node $(hostname -s)"
}

main "$@"
