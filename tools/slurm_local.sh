#!/usr/bin/env bash
# A real one-node, CPU-only SLURM cluster on this machine, for `make test-slurm` (Debian 12 / Slurm 22.05).
#
#   tools/slurm_local.sh install   # apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server
#   tools/slurm_local.sh start     # install if needed, write the config, start the daemons, wait until ready
#   tools/slurm_local.sh status    # which daemons run (exit 0 when all of them do) and the node state
#   tools/slurm_local.sh check     # srun true; sbatch a job and read it back with sacct
#   tools/slurm_local.sh stop      # cancel the jobs, stop the daemons this script started, newest first
#   tools/slurm_local.sh wipe      # stop, then delete the state (job ids restart at 1, accounting db is lost)
#
# Needs root (SlurmUser=root) and no systemd: every daemon is started by hand and its PID recorded under
# $ADPM_SLURM_HOME/run; `stop` kills exactly those PIDs. Nothing else on the machine is touched, except that
# the config is written to /etc/slurm (where sinfo/sbatch/srun look for it); the script refuses to overwrite a
# slurm.conf it did not write. Accounting (sacct, which submitit polls) goes through slurmdbd to a private
# MariaDB server with its own data directory, reachable only through its unix socket.
#
# Environment: ADPM_SLURM_HOME (state, logs, PIDs; default /var/lib/adpm-slurm), ADPM_SLURM_PARTITION (cpu),
# ADPM_SLURM_NODE (node name, need not resolve; default node1), ADPM_SLURM_DEF_MEM_PER_CPU (MB, default 1024).
set -euo pipefail

HOME_DIR=${ADPM_SLURM_HOME:-/var/lib/adpm-slurm}
PARTITION=${ADPM_SLURM_PARTITION:-cpu}
NODE=${ADPM_SLURM_NODE:-node1}
DEF_MEM_PER_CPU=${ADPM_SLURM_DEF_MEM_PER_CPU:-1024}
CLUSTER=adpm
CONF_DIR=/etc/slurm
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
MARKER="# written by tools/slurm_local.sh (analytic-dpm): a throwaway one-node test cluster"
MYSQL_SOCKET=/run/mysqld/mysqld.sock   # the client library's default: slurmdbd connects to StorageHost=localhost
RUN=$HOME_DIR/run
LOG=$HOME_DIR/log
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop goes in reverse (newest first)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd sinfo sbatch srun sacct scontrol munged munge unmunge mariadbd
          mariadb-install-db mariadb-admin)

say() { printf 'slurm_local: %s\n' "$*"; }
die() { printf 'slurm_local: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root: the test cluster runs its daemons with SlurmUser=root"
}

# ------------------------------------------------------------------------------------------------ install
have_binaries() {
    local b
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || return 1; done
}

cmd_install() {
    need_root
    if have_binaries; then
        say "packages already installed ($(slurmd -V))"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} with this system's package manager"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # daemons must not start on install (Debian containers have a policy-rc.d that refuses it anyway)
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; then
        say "apt-get install failed; updating the package lists and retrying"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    fi
    have_binaries || die "installed ${PACKAGES[*]} but some of ${BINARIES[*]} are still missing"
    say "installed in $((SECONDS - t0)) s: $(slurmd -V)"
}

# ------------------------------------------------------------------------------------------------ config
hardware_line() {
    # "NodeName=<host> CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24152"
    local line
    line=$(slurmd -C | head -n 1)
    [[ $line == NodeName=* ]] || die "unexpected output of slurmd -C: $line"
    printf '%s' "${line#NodeName=* }"
}

slurm_conf() {
    local host
    host=$(hostname -s)
    cat <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after 5 s instead of ~120 s
AuthInfo=cred_expire=5
StateSaveLocation=$HOME_DIR/ctld
SlurmdSpoolDir=$HOME_DIR/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default each job takes the whole node's memory and jobs run one at a time
DefMemPerCPU=$DEF_MEM_PER_CPU
# an impossible request fails at submit instead of pending forever
EnforcePartLimits=ALL
SchedulerType=sched/backfill
# the defaults delay every job by 3-60 s
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
# submitit's job process ignores SIGTERM: cancel/requeue wait KillWait seconds before SIGKILL
KillWait=5
ReturnToService=2
JobRequeue=1
InactiveLimit=0
MinJobAge=300
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 $(hardware_line) State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
    cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
# MariaDB's root account authenticates by unix socket: no password stored anywhere
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=${CLUSTER}_slurm_acct_db
EOF
}

write_if_changed() {  # path mode content
    local path=$1 mode=$2 content=$3
    if [[ -e $path ]] && ! grep -qxF "$MARKER" "$path"; then
        die "$path exists and was not written by this script: refusing to overwrite a real SLURM config"
    fi
    if [[ ! -e $path ]] || [[ $(cat "$path") != "$content" ]]; then
        printf '%s\n' "$content" >"$path.tmp"
        chmod "$mode" "$path.tmp"
        mv -f "$path.tmp" "$path"
        return 0
    fi
    chmod "$mode" "$path"
    return 1
}

prepare() {
    # slurmctld only creates the last component of its state path (and exits 0 in daemon mode before dying
    # of a missing parent), so every directory is made here first
    mkdir -p "$CONF_DIR" "$HOME_DIR/ctld" "$HOME_DIR/d" "$RUN" "$LOG"
    chmod 755 "$HOME_DIR"
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o mysql -g mysql -m 755 /run/mysqld
    local changed=0
    write_if_changed "$SLURM_CONF_FILE" 644 "$(slurm_conf)" && changed=1
    write_if_changed "$DBD_CONF_FILE" 600 "$(slurmdbd_conf)" && changed=1  # slurmdbd refuses a readable one
    if [[ $changed == 1 ]] && is_running slurmctld; then
        say "warning: the configuration changed while the cluster runs; run '$0 stop' then '$0 start'"
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating the munge key"
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
}

# ------------------------------------------------------------------------------------------------ daemons
alive() {  # a process that exists and is not a zombie waiting for init to reap it
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [[ -n $state && $state != Z ]]
}

pid_of() {  # the PID this script recorded for a daemon, if that process still runs
    local f=$RUN/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    printf '%s' "$pid"
}

is_running() { pid_of "$1" >/dev/null; }

wait_for() {  # seconds description command...
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < limit)) || { say "gave up waiting ${limit} s for $what"; return 1; }
        sleep 0.2
    done
}

fail_start() {  # daemon logfile
    say "$1 did not come up; the end of $2:"
    tail -n 25 "$2" >&2 2>/dev/null || true
    die "could not start $1"
}

record_pidfile() {  # daemon pidfile-written-by-the-daemon [logfile]
    local name=$1 f=$2 logf=${3:-$LOG/$1.log}
    wait_for 10 "$name pid file" test -s "$f" || fail_start "$name" "$logf"
    cp "$f" "$RUN/$name.pid.tmp" && mv -f "$RUN/$name.pid.tmp" "$RUN/$name.pid"
    is_running "$name" || fail_start "$name" "$logf"
}

munge_ok() { { munge -n | unmunge; } >/dev/null 2>&1; }

start_munged() {
    if munge_ok; then
        say "munged already answers (pid $(pid_of munged || echo 'not started by this script'))"
        return 0
    fi
    rm -f "$RUN/munged.pid"
    # no munged answers: --force takes over a stale socket left by a killed one; logs to /var/log/munge/
    runuser -u munge -- /usr/sbin/munged --force
    record_pidfile munged /run/munge/munged.pid /var/log/munge/munged.log
    wait_for 10 munge munge_ok || fail_start munged /var/log/munge/munged.log
}

mysql_ping() { mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" -uroot ping; }

start_mariadbd() {
    if is_running mariadbd; then return 0; fi
    if mysql_ping >/dev/null 2>&1; then  # e.g. started by systemd on install: root logs in by socket there too
        say "using the MariaDB server that already answers on $MYSQL_SOCKET (not started by this script)"
        return 0
    fi
    local datadir=$HOME_DIR/mysql
    if [[ ! -d $datadir/mysql ]]; then
        say "initialising the accounting database in $datadir"
        install -d -o mysql -g mysql -m 750 "$datadir"
        mariadb-install-db --no-defaults --user=mysql --datadir="$datadir" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || fail_start mariadb-install-db "$LOG/mariadb-install.log"
    fi
    rm -f /run/mysqld/adpm-mariadbd.pid
    # no networking: only the unix socket; small buffers, this database holds a few job records
    nohup mariadbd --no-defaults --user=mysql --datadir="$datadir" --socket="$MYSQL_SOCKET" --skip-networking \
        --pid-file=/run/mysqld/adpm-mariadbd.pid --log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=32M \
        </dev/null >>"$LOG/mariadbd.log" 2>&1 &
    record_pidfile mariadbd /run/mysqld/adpm-mariadbd.pid
    wait_for 30 mariadb mysql_ping || fail_start mariadbd "$LOG/mariadbd.log"
}

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

start_slurm_daemon() {  # name port [args...]
    local name=$1 port=$2
    shift 2
    if is_running "$name"; then return 0; fi
    if port_open "$port"; then die "port $port is taken (another $name?): stop it first"; fi
    rm -f "$RUN/$name.pid"
    "$name" "$@" || fail_start "$name" "$LOG/$name.log"   # daemonises, writes $RUN/$name.pid itself
    wait_for 10 "$name pid" test -s "$RUN/$name.pid" || fail_start "$name" "$LOG/$name.log"
    sleep 0.2
    is_running "$name" || fail_start "$name" "$LOG/$name.log"
    wait_for 20 "$name port" port_open "$port" || fail_start "$name" "$LOG/$name.log"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'; }

node_ready() {
    case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

cmd_start() {
    need_root
    local t0=$SECONDS
    cmd_install
    prepare
    start_munged
    start_mariadbd
    start_slurm_daemon slurmdbd 6819
    start_slurm_daemon slurmctld 6817
    wait_for 20 "slurmctld" scontrol ping || fail_start slurmctld "$LOG/slurmctld.log"
    start_slurm_daemon slurmd 6818 -N "$NODE"
    if ! wait_for 30 "node $NODE" node_ready; then
        # a node left DOWN/DRAINED by an earlier run (e.g. killed mid-job) comes back here
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        wait_for 15 "node $NODE" node_ready || fail_start slurmd "$LOG/slurmd.log"
    fi
    wait_for 20 "accounting" sacct -n -X -S now || fail_start slurmdbd "$LOG/slurmdbd.log"
    say "cluster '$CLUSTER' up in $((SECONDS - t0)) s: partition '$PARTITION', node '$NODE' ($(node_state))"
}

no_jobs() { [[ -z $(squeue -h -o %A 2>/dev/null) ]]; }

cmd_stop() {
    local i name pid n
    if is_running slurmctld; then  # jobs first: their processes belong to this cluster
        scancel --quiet --partition="$PARTITION" >/dev/null 2>&1 || true
        wait_for 15 "the jobs to end" no_jobs || true
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        pid=$(pid_of "$name") || { rm -f "$RUN/$name.pid"; continue; }
        kill -TERM "$pid" 2>/dev/null || true
        for ((n = 0; n < 100; n++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            say "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$RUN/$name.pid"
        say "stopped $name (pid $pid)"
    done
}

cmd_status() {
    local name pid all=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(pid_of "$name"); then
            printf '  %-10s running (pid %s)\n' "$name" "$pid"
        elif { [[ $name == munged ]] && munge_ok; } || { [[ $name == mariadbd ]] && mysql_ping >/dev/null 2>&1; }; then
            printf '  %-10s running (not started by this script)\n' "$name"
        else
            printf '  %-10s not running\n' "$name"
            all=1
        fi
    done
    if [[ $all == 0 ]]; then
        sinfo
        node_ready || all=1
    fi
    return $all
}

cmd_check() {
    local t0 jobid state n
    t0=$(date +%s.%N)
    timeout 60 srun -N1 -n1 true || die "srun true failed"
    say "srun true: ok ($(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s)"
    t0=$(date +%s.%N)
    jobid=$(sbatch --parsable --job-name=adpm-check --output=/dev/null --wrap 'echo ok') || die "sbatch failed"
    state=""
    for ((n = 0; n < 300; n++)); do
        state=$(sacct -n -X -P -j "$jobid" -o State 2>/dev/null | head -n 1)
        [[ $state == COMPLETED || $state == FAILED || $state == CANCELLED* ]] && break
        sleep 0.2
    done
    [[ $state == COMPLETED ]] || die "sbatch job $jobid ended as '${state:-unknown}' in sacct"
    say "sbatch + sacct: job $jobid COMPLETED ($(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s)"
}

cmd_wipe() {
    need_root
    cmd_stop
    [[ $HOME_DIR == /* && $HOME_DIR != / ]] || die "ADPM_SLURM_HOME must be an absolute path, not '$HOME_DIR'"
    rm -rf "$HOME_DIR"
    say "deleted $HOME_DIR"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) need_root; cmd_stop ;;
    status) cmd_status ;;
    check) cmd_check ;;
    wipe) cmd_wipe ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
