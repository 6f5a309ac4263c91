#!/bin/bash
# Compares two BPF objects as the kernel sees them: the bytes of every program, map and data
# section, the relocations of the programs by symbol name, and the BTF types (as C). Line info and
# the order of symbols and types may differ. For a refactoring of bpf/:
#   git show HEAD:pkg/kernel/tether_bpfel.o > /tmp/old.o && make generate &&
#   scripts/bpfobj-compare.sh /tmp/old.o pkg/kernel/tether_bpfel.o
set -euo pipefail
a=$1 b=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
secs() { llvm-objdump-14 -h "$1" | awk 'NR>5 && $1 > 0 && $2 !~ /^\.(BTF|strtab|symtab|rel|llvm_addrsig)/ {print $2}' | sort; }
rels() { llvm-readelf-14 -r "$1" | awk '/^Relocation section/ {s=$3} /R_BPF/ {print s, $1, $3, $5}' | grep -v 'rel\.BTF' | sort; }
btf() { bpftool btf dump file "$1" format c | sort; }
status=0
diff <(secs "$a") <(secs "$b") >/dev/null || { echo "the sections differ:"; diff <(secs "$a") <(secs "$b") || true; status=1; }
for s in $(secs "$a"); do
	llvm-objcopy-14 --dump-section "$s=$tmp/a" "$a" /dev/null
	llvm-objcopy-14 --dump-section "$s=$tmp/b" "$b" /dev/null 2>/dev/null || : >"$tmp/b"
	if ! cmp -s "$tmp/a" "$tmp/b"; then
		n() { llvm-objdump-14 -d --no-show-raw-insn -j "$s" "$1" | grep -c '^ *[0-9]*:' || true; }
		echo "section $s differs ($(n "$a") -> $(n "$b") instructions)"
		status=1
	fi
done
diff <(rels "$a") <(rels "$b") >/dev/null || { echo "the programs' relocations differ"; status=1; }
diff <(btf "$a") <(btf "$b") >/dev/null || { echo "the BTF types differ"; status=1; }
[ $status = 0 ] && echo "same programs, maps, relocations and types ($(secs "$a" | wc -l) sections)"
exit $status
