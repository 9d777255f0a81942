#!/bin/bash
# Run beside `cargo xtask bench`: packets per second through the proxy
# namespace's client side (p0) and server side (p1) over 2 s of each
# ApacheBench run; divide by that mode's requests per second.
n=0
while [ $n -lt "${1:-3}" ]; do
  if pid=$(pgrep -x ab | head -1); then
    n=$((n + 1)); sleep 1
    ns=$(ip netns list | awk '{print $1}' | grep -- '-bench-p$' | head -1)
    count() { for i in p0 p1; do for d in rx tx; do
      ip netns exec "$ns" cat /sys/class/net/$i/statistics/${d}_packets; done; done; }
    before=($(count)); sleep 2; after=($(count))
    relay=$(ip netns pids "$ns" | xargs -r ps -o comm= -p | sort -u | tr '\n' ' ')
    echo "ab $n [$relay] per second: p0 rx $(((after[0] - before[0]) / 2)) tx $(((after[1] - before[1]) / 2))," \
      "p1 rx $(((after[2] - before[2]) / 2)) tx $(((after[3] - before[3]) / 2))"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.3; done
  fi
  sleep 0.1
done
