#!/bin/bash
# start_cluster.sh DIR : a private munged + slurmctld + two slurmd (n1, n2) on 127.0.0.1, all state
# under DIR (the recipe in shared/notes/local-slurm-cluster.md). Touches nothing in /etc or /run.
# Afterwards: export SLURM_CONF=DIR/slurm.conf
#   CTLD_PORT (16817), NODE_PORT (17001; n2 takes NODE_PORT+1), FIRST_JOB_ID (1), CRED_EXPIRE (5)
# Distinct ports and first job ids let two clusters (and the jobs' derived ports) coexist on one host.
set -euo pipefail
D=$(realpath -m "${1:?scratch dir}"); H=$(hostname -s)
CTLD_PORT=${CTLD_PORT:-16817}; P1=${NODE_PORT:-17001}; P2=$((P1 + 1))
mkdir -p "$D"/{state,spool,log,pid,munge}
chmod 0755 "$D"; chown munge:munge "$D/munge"; chmod 0711 "$D/munge"   # munged: socket dir must be o+x
[ -f "$D/munge/munge.key" ] || { mungekey --create --keyfile="$D/munge/munge.key"; chown munge:munge "$D/munge/munge.key"; chmod 0400 "$D/munge/munge.key"; }
su -s /bin/sh munge -c "/usr/sbin/munged --socket=$D/munge/munge.sock --key-file=$D/munge/munge.key \
  --pid-file=$D/munge/munged.pid --log-file=$D/munge/munged.log --seed-file=$D/munge/munged.seed"
cat > "$D/slurm.conf" <<CONF
ClusterName=localtest
SlurmctldHost=${H}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.sock,cred_expire=${CRED_EXPIRE:-5}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
FirstJobId=${FIRST_JOB_ID:-1}
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/pid/slurmctld.pid
SlurmdPidFile=$D/pid/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
NodeName=n[1-2] NodeHostname=${H} NodeAddr=127.0.0.1 Port=${P1}-${P2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$D/slurm.conf"
slurmctld && slurmd -N n1 && slurmd -N n2          # each daemonizes and writes its pid file
for _ in $(seq 480); do
  [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" = 2 ] && exit 0; sleep 0.25
done
echo "cluster not idle after 120 s (logs: $D/log)" >&2; exit 1
