#!/usr/bin/env bash
# A real SLURM cluster on this machine, one node or several, for llmft's tests and CI (Debian/Ubuntu, run as root,
# no systemd).
#
#   tools/local-slurm.sh start  [--nodes N] [STATE_DIR]   install the packages if missing, start munged, MariaDB,
#                       slurmdbd, slurmctld and N slurmd (default 1); print the environment to export (also written
#                       to STATE_DIR/env.sh). A no-op that prints the env when up with this configuration; running
#                       with another one (1 node <-> 2 nodes): stopped and started again with the new one.
#   tools/local-slurm.sh stop   [STATE_DIR]   cancel the jobs, stop every daemon started here, leave no process behind
#   tools/local-slurm.sh status [STATE_DIR]   daemons, sinfo, squeue, sacct; exit status 0 only when healthy
#   tools/local-slurm.sh env    [STATE_DIR]   print the environment to export (the cluster must be running)
#
# STATE_DIR (default /tmp/llmft-slurm) holds everything: configs (etc/), munge key and socket (munge/), the MariaDB
# data (mysql/), SLURM state (state/), logs (log/), pid files (run/) and the fake GPU devices (dev/).
# Progress goes to stderr and only the `export` lines to stdout, so `eval "$(tools/local-slurm.sh start)"` works.
#
# One node (`start`): named after `hostname -s`, address 127.0.0.1, slurmd on port 6818.
# Several nodes (`start --nodes 2`): Debian's slurmd is built with multiple-slurmd support, so one slurmd per node
# (`slurmd -N n1`, `slurmd -N n2`), each with its own port (6831, 6832...), address (127.0.0.2, 127.0.0.3...) and
# per-node spool dir, pid file and log (`%n` in slurm.conf: state/d-n1, run/slurmd-n1.pid, log/slurmd-n1.log). Each
# slurmd runs in private mount and UTS namespaces (unshare): `hostname` is n1 or n2 there, and STATE_DIR/etc/hosts
# (this machine's /etc/hosts plus the node names) is bind-mounted on /etc/hosts, so n1 and n2 resolve inside jobs
# (MASTER_ADDR=n1) without touching the machine's own /etc/hosts or hostname. Every job step and task inherits the
# namespaces of its node's slurmd; the network is the machine's, so ranks on "different nodes" meet over loopback.
#
# Each node claims what Jean Zay jobs ask for, whatever this machine has (SlurmdParameters=config_overrides): 8 fake
# GPUs (gres.conf points at character devices under STATE_DIR/dev), features a100,h100,v100-32g and 192 CPUs
# (2 sockets x 48 cores x 2 threads: A100 jobs ask 8 tasks x 8 CPUs, H100 jobs 4 x 24 with --hint=nomultithread),
# in every partition: debug (default) and Jean Zay's gpu_p5 (A100), gpu_p6 (H100), gpu_p13 (V100). A node line
# with the real CPU count (nproc) would refuse those requests, even with --test-only; jobs share the real CPUs.
# Accounts abc@a100/abc@h100/abc@v100 and Jean Zay's QoS (with their MaxWall) exist and are enforced, for root
# (and $SUDO_USER, and the comma-separated users of $LLMFT_SLURM_USERS).
# Ports (loopback): slurmctld 6817, slurmd 6818 (one node) or 6831, 6832... (n1, n2...), slurmdbd 6819, MariaDB 6829
# (not 3306: CI may run its own MySQL).
set -euo pipefail

CLUSTER=local
CTLD_PORT=6817
SLURMD_PORT=6818        # one node
NODE_PORT_BASE=6830     # several nodes: node i listens on 6830 + i
MAX_NODES=9
DBD_PORT=6819
DB_PORT=6829
DB_USER=slurm
DB_PASS=llmft-local-slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
# the node claims 2 sockets x 48 cores x 2 threads = 192 CPUs, like a hyperthreaded Jean Zay node: H100 jobs ask
# 4 tasks x 24 CPUs with --hint=nomultithread (96 cores), A100 jobs 8 x 8 (64 cores); and a one-task job gets a
# whole core (2 CPUs), so `sbatch --wrap 'srun -n2 ...'` runs two tasks as on a real hyperthreaded cluster
SOCKETS=2
CORES_PER_SOCKET=48
THREADS_PER_CORE=2
NUM_GPUS=8
FEATURES=a100,h100,v100-32g
JZ_PARTITIONS=(gpu_p5 gpu_p6 gpu_p13)
# name:MaxWall, as on Jean Zay (llmft's conf/cluster/jeanzay.yaml)
QOS_LIST=(qos_gpu-dev:02:00:00 qos_gpu-t3:20:00:00 qos_gpu-t4:100:00:00
          qos_gpu_a100-dev:02:00:00 qos_gpu_a100-t3:20:00:00
          qos_gpu_h100-dev:02:00:00 qos_gpu_h100-t3:20:00:00 qos_gpu_h100-t4:100:00:00)
PROJECT_ACCOUNTS=(abc@a100 abc@h100 abc@v100)
MARK=LLMFT_LOCAL_SLURM   # environment marker of every daemon started here (found again by `stop`)
WAIT_S=60

T0=$(date +%s%N)
log() { printf '[local-slurm +%ss] %s\n' "$(elapsed)" "$*" >&2; }
elapsed() { local ms=$((($(date +%s%N) - T0) / 1000000)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
die() { printf '[local-slurm] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '5,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

CMD=${1:-}
[[ $CMD =~ ^(start|stop|status|env)$ ]] || usage
shift
NUM_NODES=1
STATE_ARG=""
while (($#)); do
    case $1 in
        --nodes) [[ $CMD == start && $# -ge 2 ]] || usage; NUM_NODES=$2; shift 2 ;;
        --nodes=*) [[ $CMD == start ]] || usage; NUM_NODES=${1#*=}; shift ;;
        -*) usage ;;
        *) [[ -z $STATE_ARG ]] || usage; STATE_ARG=$1; shift ;;
    esac
done
[[ $NUM_NODES =~ ^[1-9]$ && $NUM_NODES -le $MAX_NODES ]] || die "--nodes takes a number from 1 to $MAX_NODES"
ROOT=$(realpath -m "${STATE_ARG:-/tmp/llmft-slurm}")
ETC=$ROOT/etc
RUN=$ROOT/run
LOG=$ROOT/log
MUNGE_DIR=$ROOT/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
DB_DIR=$ROOT/mysql
DB_SOCKET=$DB_DIR/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf
HOST=$(hostname -s 2>/dev/null || hostname)   # this machine: slurmctld's host, and the node of a one-node cluster
HOST=${HOST:-localhost}

# the nodes: for `start` those asked for; for the other commands those of the running configuration
NODES=()
if [[ $CMD == start ]]; then
    if ((NUM_NODES == 1)); then NODES=("$HOST"); else for ((i = 1; i <= NUM_NODES; i++)); do NODES+=("n$i"); done; fi
elif [[ -f $SLURM_CONF ]]; then
    mapfile -t NODES < <(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$SLURM_CONF")
fi
MULTI=0   # several nodes: n1, n2... with per-node paths (%n)
if [[ $CMD == start ]]; then
    ((NUM_NODES > 1)) && MULTI=1
elif [[ -f $SLURM_CONF ]] && grep -q '^SlurmdPidFile=.*%n' "$SLURM_CONF"; then
    MULTI=1
fi

# node_index NODE: i of node n<i> (0 for the one node); node_port, node_addr, slurmd_pidfile, slurmd_log NODE
node_index() { if ((MULTI)); then echo "${1#n}"; else echo 0; fi; }
node_port() { if ((MULTI)); then echo $((NODE_PORT_BASE + $(node_index "$1"))); else echo "$SLURMD_PORT"; fi; }
node_addr() { if ((MULTI)); then echo "127.0.0.$(($(node_index "$1") + 1))"; else echo 127.0.0.1; fi; }
slurmd_pidfile() { if ((MULTI)); then echo "$RUN/slurmd-$1.pid"; else echo "$RUN/slurmd.pid"; fi; }
slurmd_log() { if ((MULTI)); then echo "$LOG/slurmd-$1.log"; else echo "$LOG/slurmd.log"; fi; }

# --- processes ----------------------------------------------------------------------------------------------------

# pid_of NAME PIDFILE: the pid in PIDFILE if that process is alive and is NAME (guards against recycled pids; a
# killed daemon stays a zombie until the machine's init reaps it, and counts as dead)
pid_of() {
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    [[ $(sed -n 's/.*) \(.\).*/\1/p' "/proc/$pid/stat" 2>/dev/null) =~ ^[ZX]?$ ]] && return 1
    echo "$pid"
}

# name:pidfile of each daemon, in start order: one slurmd per node, plus any live slurmd of another configuration
# (a one-node cluster being switched to two nodes, or back)
daemons() {
    local node file
    printf '%s\n' "munged:$MUNGE_DIR/munged.pid" "mariadbd:$DB_DIR/mysqld.pid" "slurmdbd:$RUN/slurmdbd.pid" \
        "slurmctld:$RUN/slurmctld.pid"
    for node in "${NODES[@]}"; do echo "slurmd:$(slurmd_pidfile "$node")"; done
    for file in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do
        [[ -f $file ]] && pid_of slurmd "$file" >/dev/null || continue
        for node in "${NODES[@]}"; do [[ $file == "$(slurmd_pidfile "$node")" ]] && continue 2; done
        echo "slurmd:$file"
    done
}

all_daemons_alive() {
    local entry
    while read -r entry; do pid_of "${entry%%:*}" "${entry#*:}" >/dev/null || return 1; done < <(daemons)
}

# pids of the processes carrying our marker for this ROOT (daemons, slurmstepd) or running a job of this cluster
marked_pids() {
    local dir pid env self_chain=" $$ " p=$$
    while [[ $p -gt 1 ]]; do
        p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 1)
        self_chain+="$p "
    done
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ $self_chain == *" $pid "* ]] && continue
        env=$({ tr '\0' '\n' <"$dir/environ"; } 2>/dev/null) || continue
        if grep -qxF "$MARK=$ROOT" <<<"$env" \
            || { grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env"; }; then
            echo "$pid"
        fi
    done
}

# terminate SECONDS PIDS...: SIGTERM, wait up to SECONDS, then SIGKILL
terminate() {
    local grace=$1 alive i p
    shift
    local pids=("$@")
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive=()
        for p in "${pids[@]}"; do [[ -d /proc/$p ]] && alive+=("$p"); done
        ((${#alive[@]})) || return 0
        sleep 0.1
    done
    log "killing ${alive[*]} (did not stop on SIGTERM)"
    kill -KILL "${alive[@]}" 2>/dev/null || true
    sleep 0.2
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# check_port PORT WHAT: fail clearly when someone else listens on PORT
check_port() {
    local port=$1 what=$2 owner=""
    port_busy "$port" || return 0
    command -v ss >/dev/null && owner=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -1)
    die "port $port (for $what) is already in use ${owner:+by $owner}; another local SLURM (other STATE_DIR?) or a" \
        "system service runs: stop it first"
}

# wait_for WHAT LOGFILE CMD...: retry CMD every 0.2 s for WAIT_S seconds; on timeout show LOGFILE and fail
wait_for() {
    local what=$1 logfile=$2 i
    shift 2
    for ((i = 0; i < WAIT_S * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out after ${WAIT_S}s waiting for $what; last lines of $logfile:"
    tail -n 30 "$logfile" >&2 2>/dev/null || true
    exit 1
}

# --- installation and configuration -------------------------------------------------------------------------------

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) == installed ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    # keep the packages' own init scripts from starting daemons on the default ports/paths
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 || rc=$?
    if ((rc)); then
        log "apt-get install failed; running apt-get update and retrying"
        rc=0
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >&2 || rc=$?
    fi
    ((own_policy)) && rm -f "$policy"
    ((rc == 0)) || die "could not install ${missing[*]}"
}

# put_file PATH MODE OWNER: write stdin to PATH if the content changed
put_file() {
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$path"
    fi
    chmod "$mode" "$path"
    chown "$owner" "$path"
}

make_layout() {
    mkdir -p "$ROOT"
    chmod 755 "$ROOT"
    mkdir -p "$ETC" "$RUN" "$LOG" "$ROOT/state/ctld" "$ROOT/state/d" "$ROOT/dev" "$MUNGE_DIR" "$DB_DIR/data"
    local node
    for node in "${NODES[@]}"; do ((MULTI)) && mkdir -p "$ROOT/state/d-$node"; done
    chmod 755 "$ETC" "$RUN" "$LOG" "$ROOT/dev"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    chown mysql:mysql "$DB_DIR" "$DB_DIR/data"
    chmod 750 "$DB_DIR/data"
    runuser -u munge -- test -x "$MUNGE_DIR" \
        || die "the munge user cannot reach $MUNGE_DIR: pick a STATE_DIR whose parents are world-searchable (755)"
    runuser -u mysql -- test -x "$DB_DIR" || die "the mysql user cannot reach $DB_DIR: pick another STATE_DIR"

    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force 2>/dev/null \
                || dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 600 "$MUNGE_DIR/munge.key"

    # fake GPUs: gres.conf File= must name character devices (NVIDIA's major 195); slurmd then sets
    # CUDA_VISIBLE_DEVICES for jobs asking --gres=gpu:N. Every node shares the same fake devices.
    local i
    for ((i = 0; i < NUM_GPUS; i++)); do
        if [[ ! -c $ROOT/dev/nvidia$i ]]; then
            rm -f "$ROOT/dev/nvidia$i"
            mknod -m 666 "$ROOT/dev/nvidia$i" c 195 "$i" 2>/dev/null \
                || log "mknod is not permitted here: fake GPUs without device files (no CUDA_VISIBLE_DEVICES in jobs)"
        fi
    done
}

# --- the configuration files: written by write_configs; `start` restarts a cluster whose files differ ----------

gres_conf() {
    local node i gres_files=1
    for ((i = 0; i < NUM_GPUS; i++)); do [[ -c $ROOT/dev/nvidia$i ]] || gres_files=0; done
    for node in "${NODES[@]}"; do
        if ((gres_files)); then
            echo "NodeName=$node Name=gpu File=$ROOT/dev/nvidia[0-$((NUM_GPUS - 1))]"
        else
            echo "NodeName=$node Name=gpu Count=$NUM_GPUS"
        fi
    done
}

# the machine's /etc/hosts (without our lines) plus the node names: bind-mounted on /etc/hosts for each slurmd
hosts_file() {
    local node
    grep -v '# llmft local-slurm node$' /etc/hosts || true
    for node in "${NODES[@]}"; do echo "$(node_addr "$node") $node   # llmft local-slurm node"; done
}

slurm_conf() {
    local ncpu mem_total real_mem partitions="" p node node_list node_lines="" what="a one-node cluster"
    ncpu=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys these: same file from any caller
    mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    real_mem=$((mem_total - (mem_total / 20 < 1024 ? mem_total / 20 : 1024)))   # 5 % (at most 1 GiB) under
    local node_cpus=$((SOCKETS * CORES_PER_SOCKET * THREADS_PER_CORE))
    node_list=$(join , "${NODES[@]}")
    for p in "${JZ_PARTITIONS[@]}"; do
        partitions+="PartitionName=$p Nodes=$node_list MaxTime=INFINITE State=UP"$'\n'
    done
    for node in "${NODES[@]}"; do
        if ((MULTI)); then node_lines+="NodeName=$node NodeHostname=$node Port=$(node_port "$node") "
        else node_lines+="NodeName=$node "; fi
        node_lines+="NodeAddr=$(node_addr "$node") CPUs=$node_cpus Boards=1 SocketsPerBoard=$SOCKETS"
        node_lines+=" CoresPerSocket=$CORES_PER_SOCKET ThreadsPerCore=$THREADS_PER_CORE RealMemory=$real_mem"
        node_lines+=" Gres=gpu:$NUM_GPUS Features=$FEATURES State=UNKNOWN"$'\n'
    done
    # several nodes: per-node paths (%n: the node's name); each node has its own Port= on its NodeName line
    local per_node=""
    if ((MULTI)); then per_node=-%n what="a ${#NODES[@]}-node cluster ($node_list: one slurmd each)"; fi

    cat <<EOF
# Written by llmft tools/local-slurm.sh (rewritten at every start): $what on this machine.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~10 s instead of 120 s
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$ROOT/state/ctld
SlurmdSpoolDir=$ROOT/state/d$per_node
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd$per_node.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd$per_node.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$ETC/plugstack.conf
MailProg=/bin/true
# no cgroups in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munge socket for the slurmdbd connection (AuthInfo's socket= is not used for it)
AccountingStoragePass=$MUNGE_SOCKET
# accounts and QoS must exist (like on Jean Zay); QoS over their MaxWall are refused at submission
AccountingStorageEnforce=associations,limits,qos
# sacct's AllocTRES shows the GPUs too
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
SchedulerType=sched/backfill
# react within ~1 s instead of 30-60 s (requeued / newly eligible jobs)
SchedulerParameters=bf_interval=1,sched_interval=1
# refuse impossible requests at submission instead of pending forever
EnforcePartLimits=ALL
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
# finished jobs stay visible to squeue/scontrol for 10 minutes
MinJobAge=600
# the node may claim more than the machine has (Jean Zay-sized requests: 8 tasks x 8 CPUs, 8 GPUs)
SlurmdParameters=config_overrides
$node_lines# the machine has $ncpu CPUs: jobs of several tasks share them (no cgroups, no binding)
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
$partitions
EOF
}

# the files as they are match what this start would write (a running cluster with other files is restarted)
config_current() {
    [[ -f $SLURM_CONF && -f $ETC/gres.conf ]] && cmp -s <(slurm_conf) "$SLURM_CONF" \
        && cmp -s <(gres_conf) "$ETC/gres.conf" && { ((!MULTI)) || cmp -s <(hosts_file) "$ETC/hosts"; }
}

write_configs() {
    slurm_conf | put_file "$ETC/slurm.conf" 644 root:root
    gres_conf | put_file "$ETC/gres.conf" 644 root:root
    if ((MULTI)); then hosts_file | put_file "$ETC/hosts" 644 root:root; fi
    put_file "$ETC/plugstack.conf" 644 root:root </dev/null

    put_file "$ETC/slurmdbd.conf" 600 root:root <<EOF
# Written by llmft tools/local-slurm.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

    put_file "$ETC/my.cnf" 644 root:root <<EOF
# Written by llmft tools/local-slurm.sh: MariaDB for slurmdbd only, loopback only
[mysqld]
user=mysql
datadir=$DB_DIR/data
socket=$DB_SOCKET
pid-file=$DB_DIR/mysqld.pid
log-error=$DB_DIR/mysqld.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=128M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
innodb_use_native_aio=0
innodb_flush_log_at_trx_commit=2
innodb_doublewrite=0
max_allowed_packet=16M
[client]
socket=$DB_SOCKET
port=$DB_PORT
EOF
}

# --- daemons ------------------------------------------------------------------------------------------------------

start_munge() {
    if pid_of munged "$MUNGE_DIR/munged.pid" >/dev/null; then return 0; fi
    log "starting munged"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    env "$MARK=$ROOT" runuser -u munge -- munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$LOG/munged.out" 2>&1 || { cat "$LOG/munged.out" >&2 || true; die "munged did not start"; }
    wait_for "munged" "$MUNGE_DIR/munged.log" \
        bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -u root -N -B -e "$1"; }

start_mariadb() {
    if ! pid_of mariadbd "$DB_DIR/mysqld.pid" >/dev/null; then
        check_port "$DB_PORT" MariaDB
        if [[ ! -d $DB_DIR/data/mysql ]]; then
            log "initialising MariaDB in $DB_DIR/data"
            mariadb-install-db --defaults-file="$ETC/my.cnf" --auth-root-authentication-method=socket \
                --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
                || { tail -n 30 "$LOG/mariadb-install.log" >&2 || true; die "mariadb-install-db failed"; }
        fi
        log "starting MariaDB (127.0.0.1:$DB_PORT)"
        rm -f "$DB_SOCKET"
        env "$MARK=$ROOT" setsid -f mariadbd --defaults-file="$ETC/my.cnf" </dev/null >>"$LOG/mariadbd.out" 2>&1
        wait_for "MariaDB" "$DB_DIR/mysqld.log" db_sql "SELECT 1"
        wait_for "MariaDB's pid file" "$DB_DIR/mysqld.log" pid_of mariadbd "$DB_DIR/mysqld.pid"
    fi
    local host
    for host in 127.0.0.1 localhost; do
        db_sql "CREATE USER IF NOT EXISTS '$DB_USER'@'$host' IDENTIFIED BY '$DB_PASS';
                GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'$host';" || die "could not create the MariaDB user"
    done
}

# start_slurm_daemon NAME PORT ARGS...: the SLURM daemons fork and write their own pid files
start_slurm_daemon() {
    local name=$1 port=$2
    shift 2
    if pid_of "$name" "$RUN/$name.pid" >/dev/null; then return 0; fi
    check_port "$port" "$name"
    log "starting $name"
    rm -f "$RUN/$name.pid"
    env "$MARK=$ROOT" "$name" "$@" </dev/null >>"$LOG/$name.out" 2>&1 \
        || { tail -n 20 "$LOG/$name.out" "$LOG/$name.log" >&2 2>/dev/null || true; die "$name did not start"; }
    wait_for "$name's pid file" "$LOG/$name.log" pid_of "$name" "$RUN/$name.pid"
}

# start_slurmd NODE: one node's slurmd; with several nodes inside its own mount and UTS namespaces (hostname NODE,
# STATE_DIR/etc/hosts on /etc/hosts), which every job step and task on that node inherits
start_slurmd() {
    local node=$1 pidfile logfile
    pidfile=$(slurmd_pidfile "$node") logfile=$(slurmd_log "$node")
    if pid_of slurmd "$pidfile" >/dev/null; then return 0; fi
    check_port "$(node_port "$node")" "slurmd $node"
    log "starting slurmd $node"
    rm -f "$pidfile"
    if ((MULTI)); then
        command -v unshare >/dev/null || die "unshare (util-linux) is needed for several nodes"
        # shellcheck disable=SC2016
        env "$MARK=$ROOT" unshare --mount --uts --propagation private -- sh -c \
            'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -N "$2"' sh "$ETC/hosts" "$node" \
            </dev/null >>"$LOG/slurmd-$node.out" 2>&1 \
            || { tail -n 20 "$LOG/slurmd-$node.out" "$logfile" >&2 2>/dev/null || true
                 die "slurmd $node did not start (private mount and UTS namespaces need root and CAP_SYS_ADMIN)"; }
    else
        env "$MARK=$ROOT" slurmd -N "$node" </dev/null >>"$LOG/slurmd.out" 2>&1 \
            || { tail -n 20 "$LOG/slurmd.out" "$logfile" >&2 2>/dev/null || true; die "slurmd did not start"; }
    fi
    wait_for "slurmd $node's pid file" "$logfile" pid_of slurmd "$pidfile"
}

# --- accounting ---------------------------------------------------------------------------------------------------

sam() { sacctmgr -i "$@" >/dev/null; }
sam_list() { sacctmgr -n -P "$@" 2>/dev/null; }

join() { local IFS=$1; shift; echo "$*"; }

# the cluster, Jean Zay's QoS and accounts, and the users' associations; only what is missing is added, with few
# sacctmgr calls (each costs ~0.4 s)
register_accounting() {
    local users=(root) u entry name wall a missing extra_users=${LLMFT_SLURM_USERS:-}
    local qos_names=(normal) accounts=(root "${PROJECT_ACCOUNTS[@]}")
    [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]] && users+=("$SUDO_USER")
    for u in ${extra_users//,/ }; do users+=("$u"); done

    sam_list show cluster format=cluster | grep -qxF "$CLUSTER" || sam add cluster "$CLUSTER"

    local existing walls=() changed=0
    existing=$(sam_list show qos format=name)
    declare -A by_wall=()
    for entry in "${QOS_LIST[@]}"; do
        name=${entry%%:*} wall=${entry#*:}
        qos_names+=("$name")
        grep -qxF "$name" <<<"$existing" && continue
        [[ -n ${by_wall[$wall]:-} ]] || walls+=("$wall")
        by_wall[$wall]+="${by_wall[$wall]:+,}$name"
    done
    for wall in "${walls[@]}"; do sam add qos "${by_wall[$wall]}" MaxWall="$wall" Flags=DenyOnLimit; changed=1; done

    existing=$(sam_list show account format=account)
    missing=()
    for a in "${PROJECT_ACCOUNTS[@]}"; do grep -qxF "$a" <<<"$existing" || missing+=("$a"); done
    if ((${#missing[@]})); then
        sam add account "$(join , "${missing[@]}")" Cluster="$CLUSTER" Description="llmft test project" Organization=llmft
        changed=1
    fi

    existing=$(sam_list show assoc format=account,user)
    for u in "${users[@]}"; do
        missing=()
        for a in "${accounts[@]}"; do grep -qxF "$a|$u" <<<"$existing" || missing+=("$a"); done
        if ((${#missing[@]})); then
            sam add user "$u" Account="$(join , "${missing[@]}")" Cluster="$CLUSTER"
            changed=1
        fi
    done

    # every account and user may use every QoS (set on the associations; re-done only after a change above)
    if ((changed)); then
        sam modify account where name="$(join , "${accounts[@]}")" cluster="$CLUSTER" \
            set QOS="$(join , "${qos_names[@]}")" DefaultQOS=normal
        sam modify user where name="$(join , "${users[@]}")" cluster="$CLUSTER" \
            set QOS="$(join , "${qos_names[@]}")" DefaultQOS=normal
    fi
}

# --- commands -----------------------------------------------------------------------------------------------------

env_lines() {
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
    printf 'export LLMFT_SLURM_STATE_DIR=%q\n' "$ROOT"
}

# node_state NODE: its state from sinfo (idle, idle* when not responding, down*, drained...)
node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -1; }

nodes_ready() {
    local node
    ((${#NODES[@]})) || return 1
    for node in "${NODES[@]}"; do
        [[ $(node_state "$node") =~ ^(idle|mixed|allocated|completing)$ ]] || return 1  # not idle*, down, drained
    done
}

# nodes_ready, after returning to service the nodes a killed slurmd or job left down or drained (their slurmd runs
# again: a test that kills a node's daemons leaves the cluster usable for the next one)
nodes_ready_or_resume() {
    local node
    for node in "${NODES[@]}"; do
        if [[ $(node_state "$node") =~ ^(down|drain|drained|draining|fail|failing) ]]; then
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        fi
    done
    nodes_ready
}

sacct_ok() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

# a daemon marked with this ROOT that is not the one its pid file names
orphans_exist() {
    local pid name entry entries known
    while read -r pid; do
        name=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
        entries=$(daemons | grep "^$name:") || continue
        known=0
        while read -r entry; do
            [[ $(pid_of "$name" "${entry#*:}" 2>/dev/null) == "$pid" ]] && known=1
        done <<<"$entries"
        ((known)) || return 0
    done < <(marked_pids)
    return 1
}

# slurmctld or a slurmd of this STATE_DIR runs
slurm_running() {
    local entry
    while read -r entry; do
        [[ ${entry%%:*} =~ ^slurm(ctld|d)$ ]] && pid_of "${entry%%:*}" "${entry#*:}" >/dev/null && return 0
    done < <(daemons)
    return 1
}

healthy() { all_daemons_alive && nodes_ready && sacct_ok; }

cmd_start() {
    local file node
    [[ $(id -u) == 0 ]] || die "must run as root (starts munged/MariaDB as their users, creates device files)"
    if config_current && healthy; then
        log "already running ($ROOT)"
        env_lines | tee "$ROOT/env.sh"
        return 0
    fi
    if [[ -f $SLURM_CONF ]] && ! config_current && slurm_running; then
        log "$ROOT runs another configuration (${#NODES[@]} node(s) asked: ${NODES[*]}): restarting it"
        cmd_stop
    fi
    if orphans_exist; then
        log "daemons of $ROOT run without their pid files (state dir deleted?): stopping them first"
        cmd_stop
    fi
    # fail before starting anything when another cluster or a service holds a port
    local entry port
    for entry in mariadbd:$DB_PORT slurmdbd:$DBD_PORT slurmctld:$CTLD_PORT; do
        port=${entry#*:}
        case ${entry%%:*} in mariadbd) file=$DB_DIR/mysqld.pid ;; *) file=$RUN/${entry%%:*}.pid ;; esac
        pid_of "${entry%%:*}" "$file" >/dev/null || check_port "$port" "${entry%%:*}"
    done
    for node in "${NODES[@]}"; do
        pid_of slurmd "$(slurmd_pidfile "$node")" >/dev/null || check_port "$(node_port "$node")" "slurmd $node"
    done
    # on a failure, stop what runs (the logs stay)
    trap 'rc=$?; if ((rc)); then log "start failed; stopping the daemons (logs in $LOG)"; cmd_stop; fi' EXIT
    install_packages
    make_layout
    write_configs
    start_munge
    start_mariadb
    start_slurm_daemon slurmdbd "$DBD_PORT"
    wait_for "slurmdbd" "$LOG/slurmdbd.log" sam_list show cluster format=cluster
    register_accounting
    start_slurm_daemon slurmctld "$CTLD_PORT"
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    wait_for "the nodes to be idle (sinfo)" "$LOG/slurmctld.log" nodes_ready_or_resume
    wait_for "sacct" "$LOG/slurmdbd.log" sacct_ok
    env_lines | put_file "$ROOT/env.sh" 644 root:root
    trap - EXIT
    log "up in $(elapsed) s: node(s) ${NODES[*]}, partitions debug (default) ${JZ_PARTITIONS[*]};" \
        "logs in $LOG. Export:"
    cat "$ROOT/env.sh"
}

cmd_stop() {
    local pid entry name file i left
    if pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    # slurmd with slurmctld, then slurmdbd (gets the last accounting records), then MariaDB with munged
    local group pids
    for group in "slurmd slurmctld" "slurmdbd" "mariadbd munged"; do
        pids=()
        while read -r entry; do
            name=${entry%%:*} file=${entry#*:}
            [[ " $group " == *" $name "* ]] || continue
            if pid=$(pid_of "$name" "$file"); then
                log "stopping $name ($pid)"
                pids+=("$pid")
            fi
            rm -f "$file"
        done < <(daemons)
        terminate 20 "${pids[@]}"
    done
    # anything left that we started (slurmstepd, job processes, a daemon whose pid file vanished)
    mapfile -t left < <(marked_pids)
    if ((${#left[@]})); then
        log "stopping leftover processes ${left[*]}"
        terminate 3 "${left[@]}"
    fi
    rm -f "$MUNGE_SOCKET" "$DB_SOCKET"
    log "stopped ($ROOT)"
}

cmd_status() {
    local entry name pid ok=0 node
    echo "state dir: $ROOT"
    while read -r entry; do
        name=${entry%%:*}
        [[ $name == slurmd && $entry == *-*.pid ]] && name="slurmd $(basename "${entry%.pid}" | cut -d- -f2-)"
        if pid=$(pid_of "${name%% *}" "${entry#*:}"); then echo "  $name: running ($pid)"
        else echo "  $name: DOWN"; ok=1; fi
    done < <(daemons)
    [[ -f $SLURM_CONF ]] || { echo "no $SLURM_CONF: not started"; return 1; }
    echo "--- sinfo"
    sinfo -N -o '%N %P %T %c %m %G %f' 2>&1 || ok=1
    echo "--- squeue"
    squeue 2>&1 || ok=1
    echo "--- sacct (last hour)"
    sacct -X -S now-1hours -o JobID,JobName,Partition,Account,QOS,State,ExitCode 2>&1 | tail -n 15 || ok=1
    for node in "${NODES[@]}"; do
        [[ $(node_state "$node") =~ ^(idle|mixed|allocated|completing)$ ]] || { echo "node $node is not ready"; ok=1; }
    done
    sacct_ok || { echo "sacct does not answer"; ok=1; }
    ((ok == 0)) && echo "healthy" || echo "UNHEALTHY"
    return $ok
}

case $CMD in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env)
        healthy || die "the cluster in $ROOT is not running (tools/local-slurm.sh start)"
        env_lines
        ;;
esac
