package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"

	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/cgroups"
)

// Requirement is one thing tetherd needs from the node, or would use if it were there.
type Requirement struct {
	Name     string `json:"name"`
	Required bool   `json:"required"` // tetherd does not start without it
	OK       bool   `json:"ok"`
	Detail   string `json:"detail"`        // what was found
	Fix      string `json:"fix,omitempty"` // how to get it, when it is missing
}

// Requirements checks the node: cgroup v2, BTF, the BPF program and map types tether loads,
// bpffs at pinDir, the cgroup freezer and cgroup.kill, and BPF LSM (optional). It changes only
// what tetherd itself would (it may mount bpffs and securityfs) and one probe cgroup it creates
// and removes. cgroupRoot is the cgroup2 mount, else cgroupErr says why there is none.
func Requirements(cgroupRoot string, cgroupErr error, pinDir string) []Requirement {
	var rs []Requirement
	add := func(name string, required bool, err error, ok, fix string) {
		r := Requirement{Name: name, Required: required, OK: err == nil, Detail: ok}
		if err != nil {
			r.Detail, r.Fix = err.Error(), fix
		}
		rs = append(rs, r)
	}

	add("cgroup v2", true, cgroupErr, "mounted at "+cgroupRoot,
		"mount the unified hierarchy (systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup)")
	_, err := os.Stat("/sys/kernel/btf/vmlinux")
	add("kernel BTF", true, err, "/sys/kernel/btf/vmlinux",
		"a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's since 2021)")
	add("BPF syscall", true, ProbeBPF(), "programs and maps load (root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN+CAP_SYS_ADMIN)",
		"run as root or with the capabilities the unit and the DaemonSet grant; kernel.unprivileged_bpf_disabled does not matter to root")
	for _, p := range []struct {
		name string
		typ  ebpf.ProgramType
	}{{"cgroup sock_addr programs (connect, sendmsg)", ebpf.CGroupSockAddr}, {"cgroup sock programs (socket create)", ebpf.CGroupSock}} {
		add(p.name, true, features.HaveProgramType(p.typ), "load", "Linux 5.8 or later with CONFIG_CGROUP_BPF=y")
	}
	add("BTF tracepoint programs (exec, fork, exit)", true, probeTPBTF(), "load",
		"Linux 5.8 or later with CONFIG_BPF_EVENTS=y and kernel BTF")
	for _, m := range []struct {
		name string
		typ  ebpf.MapType
	}{{"ring buffer maps", ebpf.RingBuf}, {"LPM trie maps", ebpf.LPMTrie}, {"map-in-map (hash of maps)", ebpf.HashOfMaps}} {
		add(m.name, true, features.HaveMapType(m.typ), "load", "Linux 5.8 or later")
	}
	add("cgroup skb and sockopt programs (packets of live sockets, detour options)", true,
		errors.Join(features.HaveProgramType(ebpf.CGroupSKB), features.HaveProgramType(ebpf.CGroupSockopt), features.HaveMapType(ebpf.SkStorage)),
		"load", "Linux 5.8 or later with CONFIG_CGROUP_BPF=y")
	add("bpf_sock_destroy (terminating revoked live sockets)", false, probeSockDestroy(), "in the kernel's BTF, with the TCP and UDP socket iterators",
		"optional: Linux 6.5 or later; without it revoked connections are cut by dropping their packets (TCP stalls, UDP sends fail) instead of being reset")
	add("cgroup unix socket hooks (connect_unix, sendmsg_unix)", false, probeCgroupAttach(ebpf.AttachCgroupUnixConnect), "load",
		"Linux 6.7 or later; without them unix socket rules need BPF LSM, else they are not enforced")
	add("bpffs", true, bpffs.Ensure(filepath.Dir(pinDir)), "mounted at "+filepath.Dir(pinDir)+" (pins survive tetherd restarts)",
		"mount -t bpf bpf /sys/fs/bpf (tetherd mounts it when it can); in a pod, mount the host's /sys/fs/bpf")
	if cgroupErr == nil {
		add("cgroup freezer and cgroup.kill", true, freezerIn(cgroupRoot), "cgroup.freeze and cgroup.kill",
			"Linux 5.14 or later (cgroup.kill)")
		add("host cgroup namespace", true, cgroups.CheckNamespace(cgroupRoot), "/proc/PID/cgroup names cgroups from the cgroup2 root",
			"run tetherd in the host's cgroup namespace; in a pod (hostPID: true) set TETHER_CGROUPNS=/proc/1/ns/cgroup and tetherd enters it")
	}

	active, err := activeLSMs()
	lsm := probeLSM()
	switch {
	case err != nil:
		lsm = fmt.Errorf("reading the active LSMs: %w", err)
	case lsm == nil && !hasLSM(active, "bpf"):
		lsm = fmt.Errorf("bpf is not among the active LSMs (%s)", active)
	}
	add("BPF LSM", false, lsm, "active ("+active+"): exec and unix socket denials stop the call itself",
		"optional: without it denied execs are killed with SIGKILL before they run user code. Needs CONFIG_BPF_LSM=y and the kernel parameter lsm=<the current list>,bpf (e.g. in GRUB_CMDLINE_LINUX), then a reboot")
	return rs
}

// probeTPBTF loads a tp_btf program for sched_process_exec, as the exec hook is (the generic
// tracing probe needs trampolines, which tp_btf does not).
func probeTPBTF() error {
	prog, err := trialProgram(ebpf.Tracing, ebpf.AttachTraceRawTp, "sched_process_exec", 0)
	if err != nil {
		return err
	}
	return prog.Close()
}

// freezerIn creates a probe cgroup below the cgroup2 root, looks for cgroup.freeze and
// cgroup.kill in it (the root has neither), and removes it.
func freezerIn(root string) error {
	dir := filepath.Join(root, fmt.Sprintf("tether-probe-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("creating a probe cgroup: %w", err)
	}
	defer os.Remove(dir)
	for _, f := range []string{"cgroup.freeze", "cgroup.kill"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
	}
	return nil
}
