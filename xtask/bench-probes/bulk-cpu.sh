#!/bin/bash
# Run beside `cargo xtask bench --seconds 15`: over 8 s of each 1-stream
# iperf3 transfer, how idle both CPUs are and the relay's user and system
# time (clock ticks, /proc/PID/stat), where tproxy-user is the relay.
n=0
while [ $n -lt "${1:-2}" ]; do
  if pid=$(pgrep -f "iperf3 -c .* -P 1 -J" | head -1); then
    n=$((n + 1)); sleep 3
    relay=$(pgrep -x tproxy-user | head -1)
    read -r _ u1 n1 s1 i1 _ _ sq1 _ </proc/stat
    [ -n "$relay" ] && r1=($(awk '{print $14, $15}' /proc/"$relay"/stat))
    sleep 8
    read -r _ u2 n2 s2 i2 _ _ sq2 _ </proc/stat
    [ -n "$relay" ] && r2=($(awk '{print $14, $15}' /proc/"$relay"/stat))
    echo "iperf3 $n: idle $((i2 - i1)) of $(((u2 - u1) + (n2 - n1) + (s2 - s1) + (i2 - i1) + (sq2 - sq1))) ticks;" \
      "relay ${relay:-none}: user $((${r2[0]:-0} - ${r1[0]:-0})) system $((${r2[1]:-0} - ${r1[1]:-0}))"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  fi
  sleep 0.2
done
