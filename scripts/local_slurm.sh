#!/usr/bin/env bash
# A local Slurm "cluster" on 127.0.0.1 for tests and try-outs: munged, slurmctld and one slurmd per
# emulated node (Debian's slurmd is built with MULTIPLE_SLURMD), from Debian's slurm-wlm 22.05.
#
#   scripts/local_slurm.sh start     # installs what is missing, (re)starts daemons, waits for idle nodes
#   scripts/local_slurm.sh stop
#
# Environment: LOCAL_SLURM_DIR (state, logs, conf; default $TMPDIR/tread-slurm), LOCAL_SLURM_NODES
# (default 2: <host>-node1, <host>-node2, resolved to 127.0.0.1 via /etc/hosts), LOCAL_SLURM_CPUS
# (per node, may exceed the real cores), LOCAL_SLURM_GPUS (advertised gpu GRES per node, backed by
# placeholder files, so --gpus-per-node=8 scripts schedule unchanged; nothing sets CUDA_VISIBLE_DEVICES).
# Prints `export SLURM_CONF=...`. No cgroups, no accounting; every daemon binds to 127.0.0.1.
set -euo pipefail
cmd="${1:-start}"
DIR="${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/tread-slurm}"
NODES="${LOCAL_SLURM_NODES:-2}"
CPUS="${LOCAL_SLURM_CPUS:-64}"
GPUS="${LOCAL_SLURM_GPUS:-8}"
HOST="$(hostname -s)"
CONF="$DIR/slurm.conf"
PORT=6818
say() { echo "[local_slurm] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() {
  alive "$1" || { rm -f "$1"; return 0; }
  local p; p="$(cat "$1")"; kill "$p" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true; rm -f "$1"
}
names=(); for ((i = 1; i <= NODES; i++)); do names+=("$HOST-node$i"); done

if [ "$cmd" = stop ]; then
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do [ -e "$f" ] && stop_pid "$f"; done
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing munge, slurmctld, slurmd, slurm-client (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
fi
for n in "$HOST" "${names[@]}"; do
  getent hosts "$n" >/dev/null || echo "127.0.0.1 $n  # tread_scale local_slurm" >> /etc/hosts
done
mkdir -p "$DIR"/{run,log,state,spool,gpu}

# munge: one key, daemon in the foreground under setsid
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
    --log-file="$DIR/log/munged.log" </dev/null >>"$DIR/log/munged.out" 2>&1 &
  echo $! > "$DIR/run/munged.pid"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

gres=""; gres_types=""
if [ "$GPUS" -gt 0 ]; then
  gres="Gres=gpu:$GPUS"; gres_types="GresTypes=gpu"
  for ((g = 0; g < GPUS; g++)); do touch "$DIR/gpu/nvidia$g"; done
  printf 'NodeName=%s-node[1-%d] Name=gpu File=%s/gpu/nvidia[0-%d]\n' "$HOST" "$NODES" "$DIR" "$((GPUS - 1))" \
    > "$DIR/gres.conf"
fi
mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 / NODES - 512 ))
new=$(cat <<CONF
ClusterName=treadlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SrunPortRange=60001-60200
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
JobRequeue=1
MailProg=/bin/true
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
$gres_types
NodeName=$HOST-node[1-$NODES] NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$PORT-$((PORT + NODES - 1)) CPUs=$CPUS RealMemory=$mem $gres State=UNKNOWN
PartitionName=gpu Nodes=$HOST-node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
)
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new" ]; then
  printf '%s\n' "$new" > "$CONF"
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do [ -e "$f" ] && stop_pid "$f"; done
fi
export SLURM_CONF="$CONF"
if ! alive "$DIR/run/slurmctld.pid"; then
  setsid /usr/sbin/slurmctld -D -i -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
  echo $! > "$DIR/run/slurmctld.pid"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
for n in "${names[@]}"; do
  mkdir -p "$DIR/spool/$n"
  if ! alive "$DIR/run/slurmd-$n.pid"; then
    setsid /usr/sbin/slurmd -D -f "$CONF" -N "$n" </dev/null >>"$DIR/log/slurmd-$n.out" 2>&1 &
    echo $! > "$DIR/run/slurmd-$n.pid"
  fi
done
for _ in $(seq 300); do
  ready=1
  for n in "${names[@]}"; do
    case "$(sinfo -h -n "$n" -o %T 2>/dev/null | head -1)" in
      idle*|mixed*|allocated*) ;;
      down*|drain*|fail*|inval*) ready=0; scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;;
      *) ready=0 ;;
    esac
  done
  [ "$ready" = 1 ] && break
  sleep 0.1
done
[ "$ready" = 1 ] || { say "nodes not ready"; tail -20 "$DIR/log/slurmctld.log" >&2; exit 1; }
say "up: ${names[*]} ($CPUS CPUs, $GPUS GPUs advertised each), conf $CONF"
echo "export SLURM_CONF=$CONF"
