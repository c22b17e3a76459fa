#!/usr/bin/env bash
# A/B comparison of kernel variants in one device session: the working tree is variant A; each PATCH (a `git diff`
# against it, kept in an ignored folder and carried to the device) is applied to a copy of the tree and built
# separately. moe-perf then runs every variant ROUNDS times in alternation (A B C A B C ...), so drift of the
# machine hits all variants alike. Logs and JSON rows go to $OUT; a table of the chosen rows is printed last.
#
#   scripts/ab_session.sh PATCH_B [PATCH_C ...]
# Environment: AB_ARGS (moe-perf args, default: LL, 2 GPUs, 128 tokens, 100 calls), ROUNDS (default 2),
#              AB_ROWS (ops to tabulate, default "dispatch combine dispatch_send dispatch_recv").
# The table has one line per variant and (dtype, tokens); unavailable rows show "-". Rows of the variant copies
# carry no git sha of their own (the copies have no .git).
set -uo pipefail
patches=()
for patch in "$@"; do patches+=("$(realpath "$patch")"); done
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-$PWD/ab-out}
mkdir -p "$OUT"
ARGS=${AB_ARGS:-"--mode ll -g 2 -b 128 -e 128 -n 100"}
ROUNDS=${ROUNDS:-2}
ROWS=${AB_ROWS:-"dispatch combine dispatch_send dispatch_recv"}
names=(A)
dirs=("$PWD")
i=0
for patch in ${patches[@]+"${patches[@]}"}; do
  i=$((i + 1))
  name=$(printf "\\x$(printf %x $((65 + i)))")
  dir=/tmp/ab_$name
  rm -rf "$dir" && mkdir -p "$dir"
  tar cf - --exclude='./build*' --exclude=./.git --exclude=./.devsnap --exclude=./ab-out --exclude=./device-out . |
    tar xf - -C "$dir"
  if ! (cd "$dir" && patch -p1 -s < "$patch"); then echo "variant $name: $patch does not apply"; exit 1; fi
  names+=("$name")
  dirs+=("$dir")
done
for k in "${!names[@]}"; do
  d=${dirs[$k]}
  t0=$(date +%s)
  if cmake -S "$d" -B "$d/build-ab" -DCMAKE_BUILD_TYPE=Release > "$OUT/configure_${names[$k]}.log" 2>&1 &&
     cmake --build "$d/build-ab" -j"$(nproc)" --target moe-perf > "$OUT/build_${names[$k]}.log" 2>&1; then
    echo "== build ${names[$k]}: ok ($(( $(date +%s) - t0 )) s)"
  else
    echo "== build ${names[$k]}: FAILED"; grep -E "error" -A3 "$OUT/build_${names[$k]}.log" | head -20; exit 1
  fi
done
for r in $(seq 1 "$ROUNDS"); do
  for k in "${!names[@]}"; do
    n=${names[$k]}
    # shellcheck disable=SC2086
    timeout 120 "${dirs[$k]}/build-ab/perf/moe-perf" $ARGS -J "$OUT/ab_${n}_$r.json" > "$OUT/ab_${n}_$r.log" 2>&1
    echo "== run $r variant $n: rc=$?"
  done
done
python3 - "$OUT" "$ROUNDS" "$ROWS" "${names[@]}" <<'PY' | tee "$OUT/ab_table.txt"
import json, sys
out, rounds, rows, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
print("variant  shape     " + " ".join(f"{r:>18}" for r in rows) + "   (median_us per round)")
for n in names:
    cells = {}  # (dtype, tokens) -> op -> [per round]
    for k in range(1, rounds + 1):
        try:
            lines = open(f"{out}/ab_{n}_{k}.json").read().splitlines()
        except OSError:
            continue
        for line in lines:
            row = json.loads(line)
            if row["op"] not in rows:
                continue
            v = row.get("median_us")
            cells.setdefault((row["dtype"], row["tokens"]), {}).setdefault(row["op"], []).append(
                "-" if v is None else f"{v:.2f}")
    for (dtype, tokens), ops in sorted(cells.items()):
        shape = f"{dtype} {tokens}"
        print(f"{n:>7}  {shape:<9} " + " ".join(f"{'/'.join(ops.get(r, [])):>18}" for r in rows))
PY
# The device tool returns few files: logs and rows travel packed.
tar czf "$OUT/ab_logs.tgz" -C "$OUT" --remove-files $(cd "$OUT" && ls ab_*_*.json ab_*_*.log configure_*.log build_*.log 2>/dev/null)
