package kernel

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Hook is one BPF program and whether it runs here.
type Hook struct {
	Name    string `json:"name"`
	Section string `json:"section"`
	Active  bool   `json:"active"`
	Reason  string `json:"reason,omitempty"`
}

// Features is what the running kernel supports, found by trial loads, and what Open chose.
type Features struct {
	ExecMode   ExecMode `json:"exec_mode"`
	ExecReason string   `json:"exec_reason"`
	LSMUsable  bool     `json:"lsm_usable"`
	ActiveLSMs string   `json:"active_lsms"`
	// SockDestroy says whether live sockets are terminated (bpf_sock_destroy from the socket
	// iterators, Linux 6.5+); without it their packets are only dropped.
	SockDestroy       bool   `json:"sock_destroy"`
	SockDestroyReason string `json:"sock_destroy_reason"`
	// SignalTask says whether the kernel kills an agent process moved out of its agent by
	// another process (bpf_send_signal_task, Linux 6.13+); without it tetherd does, from the
	// record.
	SignalTask bool   `json:"signal_task"`
	Hooks      []Hook `json:"hooks"`
}

type hookSpec struct {
	name, prog, section string
	cgroup              bool
	attach              ebpf.AttachType // cgroup hooks
	optional            bool            // trial-loaded; skipped where the kernel lacks it
	lsm                 bool            // a BPF LSM program
	guard               bool            // an LSM guard: runs wherever BPF LSM is usable
	iter                bool            // a socket iterator of the sweep (run by tetherd, never pinned)
}

var hookSpecs = []hookSpec{
	{name: "connect4", prog: bpfProgTetherConnect4, section: "cgroup/connect4", cgroup: true, attach: ebpf.AttachCGroupInet4Connect},
	{name: "connect6", prog: bpfProgTetherConnect6, section: "cgroup/connect6", cgroup: true, attach: ebpf.AttachCGroupInet6Connect},
	{name: "sendmsg4", prog: bpfProgTetherSendmsg4, section: "cgroup/sendmsg4", cgroup: true, attach: ebpf.AttachCGroupUDP4Sendmsg},
	{name: "sendmsg6", prog: bpfProgTetherSendmsg6, section: "cgroup/sendmsg6", cgroup: true, attach: ebpf.AttachCGroupUDP6Sendmsg},
	{name: "recvmsg4", prog: bpfProgTetherRecvmsg4, section: "cgroup/recvmsg4", cgroup: true, attach: ebpf.AttachCGroupUDP4Recvmsg},
	{name: "recvmsg6", prog: bpfProgTetherRecvmsg6, section: "cgroup/recvmsg6", cgroup: true, attach: ebpf.AttachCGroupUDP6Recvmsg},
	{name: "getpeername4", prog: bpfProgTetherGetpeername4, section: "cgroup/getpeername4", cgroup: true, attach: ebpf.AttachCgroupInet4GetPeername},
	{name: "getpeername6", prog: bpfProgTetherGetpeername6, section: "cgroup/getpeername6", cgroup: true, attach: ebpf.AttachCgroupInet6GetPeername},
	{name: "connect_unix", prog: bpfProgTetherConnectUnix, section: "cgroup/connect_unix", cgroup: true, attach: ebpf.AttachCgroupUnixConnect, optional: true},
	{name: "sendmsg_unix", prog: bpfProgTetherSendmsgUnix, section: "cgroup/sendmsg_unix", cgroup: true, attach: ebpf.AttachCgroupUnixSendmsg, optional: true},
	{name: "sock_create", prog: bpfProgTetherSockCreate, section: "cgroup/sock_create", cgroup: true, attach: ebpf.AttachCGroupInetSockCreate},
	{name: "egress_skb", prog: bpfProgTetherEgressSkb, section: "cgroup_skb/egress", cgroup: true, attach: ebpf.AttachCGroupInetEgress},
	{name: "setsockopt", prog: bpfProgTetherSetsockopt, section: "cgroup/setsockopt", cgroup: true, attach: ebpf.AttachCGroupSetsockopt},
	{name: "bind4", prog: bpfProgTetherBind4, section: "cgroup/bind4", cgroup: true, attach: ebpf.AttachCGroupInet4Bind},
	{name: "bind6", prog: bpfProgTetherBind6, section: "cgroup/bind6", cgroup: true, attach: ebpf.AttachCGroupInet6Bind},
	{name: "ingress_skb", prog: bpfProgTetherIngressSkb, section: "cgroup_skb/ingress", cgroup: true, attach: ebpf.AttachCGroupInetIngress},
	{name: "exec", prog: bpfProgTetherExec, section: "tp_btf/sched_process_exec"},
	{name: "migrate", prog: bpfProgTetherMigrate, section: "tp_btf/cgroup_attach_task"},
	{name: "fork", prog: bpfProgTetherFork, section: "tp_btf/sched_process_fork"},
	{name: "exit", prog: bpfProgTetherExit, section: "tp_btf/sched_process_exit"},
	{name: "exec_lsm", prog: bpfProgTetherExecLsm, section: "lsm/bprm_check_security", lsm: true},
	{name: "connect_unix_lsm", prog: bpfProgTetherConnectUnixLsm, section: "lsm/socket_connect", lsm: true},
	{name: "sendmsg_unix_lsm", prog: bpfProgTetherSendmsgUnixLsm, section: "lsm/socket_sendmsg", lsm: true},
	{name: "socket_lsm", prog: bpfProgTetherSocketLsm, section: "lsm/socket_create", lsm: true, guard: true},
	{name: "userns_lsm", prog: bpfProgTetherUsernsLsm, section: "lsm/userns_create", lsm: true, guard: true},
	{name: "bpf_lsm", prog: bpfProgTetherBpfLsm, section: "lsm/bpf", lsm: true, guard: true},
	{name: "ptrace_lsm", prog: bpfProgTetherPtraceLsm, section: "lsm/ptrace_access_check", lsm: true, guard: true},
	{name: "cgroup_open_lsm", prog: bpfProgTetherCgroupOpenLsm, section: "lsm/file_open", lsm: true, guard: true},
	{name: "unix_stream_lsm", prog: bpfProgTetherUnixStreamLsm, section: "lsm/unix_stream_connect", lsm: true, guard: true},
	{name: "unix_send_lsm", prog: bpfProgTetherUnixSendLsm, section: "lsm/unix_may_send", lsm: true, guard: true},
	{name: "sweep_tcp", prog: bpfProgTetherSweepTcp, section: "iter/tcp", iter: true},
	{name: "sweep_udp", prog: bpfProgTetherSweepUdp, section: "iter/udp", iter: true},
}

func (f *Features) hook(name string) *Hook {
	for i := range f.Hooks {
		if f.Hooks[i].Name == name {
			return &f.Hooks[i]
		}
	}
	return nil
}

// wantProgram says whether the program named prog is loaded.
func (f *Features) wantProgram(prog string) bool {
	for _, h := range hookSpecs {
		if h.prog == prog {
			return f.hook(h.name).Active
		}
	}
	return false
}

// probe finds which hooks this kernel runs and how exec is enforced.
func probe(want ExecMode, log *slog.Logger) Features {
	var f Features
	for _, h := range hookSpecs {
		hook := Hook{Name: h.name, Section: h.section, Active: true}
		if h.optional {
			if err := probeCgroupAttach(h.attach); err != nil {
				hook.Active, hook.Reason = false, fmt.Sprintf("not supported by this kernel: %v", err)
			}
		}
		f.Hooks = append(f.Hooks, hook)
	}
	f.ActiveLSMs, _ = activeLSMs()
	lsmErr := probeLSM()
	f.probeExec(want, lsmErr)
	f.probeLSMHooks(lsmErr)
	f.probeSockets()
	log.Info("probed kernel", "exec_mode", f.ExecMode, "exec_reason", f.ExecReason, "active_lsms", f.ActiveLSMs, "sock_destroy", f.SockDestroy)
	return f
}

// probeExec decides how exec is enforced: BPF LSM where it runs (lsmErr: why it cannot be
// attached), else SIGKILL from the exec tracepoint, unless the configuration (want) says.
func (f *Features) probeExec(want ExecMode, lsmErr error) {
	switch {
	case lsmErr != nil:
		f.ExecReason = fmt.Sprintf("BPF LSM programs cannot be attached: %v", lsmErr)
	case !hasLSM(f.ActiveLSMs, "bpf"):
		f.ExecReason = fmt.Sprintf("BPF LSM programs attach but never run: bpf is not in the active LSMs (%q); boot with lsm=...,bpf", f.ActiveLSMs)
	default:
		f.LSMUsable = true
		f.ExecReason = "BPF LSM is active"
	}
	switch {
	case want == ExecOff:
		f.ExecMode, f.ExecReason = ExecOff, "exec enforcement is turned off by configuration"
	case want == ExecSignal:
		f.ExecMode, f.ExecReason = ExecSignal, "exec mode signal is configured"
	case f.LSMUsable:
		f.ExecMode = ExecLSM
	case want == ExecLSM:
		f.ExecMode = ExecLSM // not usable: Open refuses to start
	default:
		f.ExecMode = ExecSignal
		f.ExecReason += "; denied execs are killed with SIGKILL before they run user code"
	}
	lsm := f.hook("exec_lsm")
	lsm.Active = f.ExecMode == ExecLSM && f.LSMUsable
	if !lsm.Active {
		lsm.Reason = f.ExecReason
	}
}

// probeLSMHooks decides the LSM programs besides exec's: the unix fallbacks and the guards.
func (f *Features) probeLSMHooks(lsmErr error) {
	// Unix rules fall back on the LSM socket hooks where the kernel has no cgroup unix hooks.
	for _, pair := range [][2]string{{"connect_unix", "connect_unix_lsm"}, {"sendmsg_unix", "sendmsg_unix_lsm"}} {
		cg, fallback := f.hook(pair[0]), f.hook(pair[1])
		switch {
		case cg.Active:
			fallback.Active, fallback.Reason = false, "not needed: "+pair[0]+" runs"
		case f.LSMUsable:
			fallback.Active = true
		default:
			fallback.Active, fallback.Reason = false, "no cgroup unix hook and no usable BPF LSM: unix sockets are not enforced"
			cg.Reason += "; unix socket rules are NOT enforced on this kernel"
		}
	}
	for _, h := range hookSpecs {
		if !h.guard {
			continue
		}
		hook := f.hook(h.name)
		hook.Active = f.LSMUsable
		switch {
		case !f.LSMUsable:
			hook.Reason = "BPF LSM is not usable here (" + lsmReason(lsmErr, f.ActiveLSMs) + "); " + guardFallback[h.name]
		default:
			if err := probeLSMHook(strings.TrimPrefix(h.section, "lsm/")); err != nil {
				hook.Active, hook.Reason = false, fmt.Sprintf("not supported by this kernel: %v; %s", err, guardFallback[h.name])
			}
		}
	}
}

// probeSockets decides how live sockets follow their agent: terminated (bpf_sock_destroy from
// the socket iterators) or only their packets dropped; and whether another task can be
// signalled.
func (f *Features) probeSockets() {
	f.SignalTask = probeKfunc("bpf_send_signal_task") == nil
	if err := probeSockDestroy(); err != nil {
		f.SockDestroyReason = fmt.Sprintf("live sockets are not terminated, only their packets dropped (cgroup_skb/egress): %v", err)
	} else {
		f.SockDestroy = true
		f.SockDestroyReason = "live sockets are terminated by bpf_sock_destroy from the socket iterators, and their packets dropped until then"
	}
	for _, name := range []string{"sweep_tcp", "sweep_udp"} {
		h := f.hook(name)
		h.Active = f.SockDestroy
		if !h.Active {
			h.Reason = f.SockDestroyReason
		}
	}
}

// guardFallback says what holds where an LSM guard does not run.
var guardFallback = map[string]string{
	"socket_lsm":      "socket families other than inet, inet6, unix and netlink are refused only to agents `tetherctl run` confines (seccomp)",
	"userns_lsm":      "user namespaces are refused only to agents `tetherctl run` confines (seccomp)",
	"bpf_lsm":         "bpf() is refused only to agents `tetherctl run` confines (seccomp, no bpffs in their view)",
	"ptrace_lsm":      "ptrace across agents is refused only to agents `tetherctl run` confines (seccomp, PID namespace)",
	"cgroup_open_lsm": "a move out of an agent is not refused, but the moved process is killed (tp_btf/cgroup_attach_task)",
	"unix_stream_lsm": "unix path rules match the path string, and only from the agent's own mount namespace",
	"unix_send_lsm":   "unix path rules match the path string, and only from the agent's own mount namespace",
}

func lsmReason(err error, active string) string {
	if err != nil {
		return fmt.Sprintf("BPF LSM programs cannot be attached: %v", err)
	}
	return fmt.Sprintf("bpf is not in the active LSMs %q", active)
}

// probeKfunc finds whether the kernel has the function name (a kfunc, an LSM hook) in its BTF.
func probeKfunc(name string) error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("reading the kernel's BTF: %w", err)
	}
	var fn *btf.Func
	return spec.TypeByName(name, &fn)
}

// probeLSMHook finds whether the kernel has the BPF LSM hook name (bpf_lsm_<name> in its BTF).
func probeLSMHook(name string) error {
	if err := probeKfunc("bpf_lsm_" + name); err != nil {
		return fmt.Errorf("no LSM hook %s: %w", name, err)
	}
	return nil
}

// noSockDestroy turns the termination of live sockets off (their packets are still dropped).
func (f *Features) noSockDestroy() {
	f.SockDestroy = false
	f.SockDestroyReason = "live sockets are not terminated (turned off), only their packets dropped (cgroup_skb/egress)"
	for _, name := range []string{"sweep_tcp", "sweep_udp"} {
		h := f.hook(name)
		h.Active, h.Reason = false, f.SockDestroyReason
	}
}

// probeSockDestroy finds whether the kernel has the bpf_sock_destroy kfunc (Linux 6.5) and the
// socket iterators it is called from, in its BTF. (features.HaveProgramType(ebpf.Tracing) would
// trial-load an fentry program, which needs trampolines that an iterator does not.) Loading the
// programs is the proof: Open fails with the verifier's words where they do not load.
func probeSockDestroy() error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("reading the kernel's BTF: %w", err)
	}
	var fn *btf.Func
	if err := spec.TypeByName("bpf_sock_destroy", &fn); err != nil {
		return fmt.Errorf("no bpf_sock_destroy kfunc (Linux 6.5 has it): %w", err)
	}
	for _, name := range []string{"bpf_iter__tcp", "bpf_iter__udp"} {
		var st *btf.Struct
		if err := spec.TypeByName(name, &st); err != nil {
			return fmt.Errorf("no %s socket iterator: %w", name, err)
		}
	}
	return nil
}

// probeCgroupAttach trial-loads a program for a cgroup sock_addr attach type.
func probeCgroupAttach(at ebpf.AttachType) error {
	prog, err := trialProgram(ebpf.CGroupSockAddr, at, "", 1)
	if err != nil {
		return err
	}
	return prog.Close()
}

// trialProgram loads a program of typ that only returns r0, to learn whether this kernel (and
// this process's privileges) allow it.
func trialProgram(typ ebpf.ProgramType, at ebpf.AttachType, attachTo string, r0 int32) (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         typ,
		AttachType:   at,
		AttachTo:     attachTo,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, r0), asm.Return()},
		License:      "GPL",
	})
}

// probeLSM trial-loads and attaches an LSM program that allows everything, then detaches it.
func probeLSM() error {
	if err := features.HaveProgramType(ebpf.LSM); err != nil {
		return err
	}
	prog, err := trialProgram(ebpf.LSM, ebpf.AttachLSMMac, "bprm_check_security", 0)
	if err != nil {
		return fmt.Errorf("loading: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachLSM(link.LSMOptions{Program: prog})
	if err != nil {
		return fmt.Errorf("attaching: %w", err)
	}
	return l.Close()
}

const securityfs = "/sys/kernel/security"

// activeLSMs reads the active LSM list, mounting securityfs if nothing is mounted there.
func activeLSMs() (string, error) {
	b, err := os.ReadFile(securityfs + "/lsm")
	if errors.Is(err, os.ErrNotExist) {
		var st unix.Statfs_t
		if serr := unix.Statfs(securityfs, &st); serr == nil && st.Type != unix.SECURITYFS_MAGIC {
			if merr := unix.Mount("securityfs", securityfs, "securityfs", 0, ""); merr != nil {
				return "", fmt.Errorf("mounting securityfs: %w", merr)
			}
			b, err = os.ReadFile(securityfs + "/lsm")
		}
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

func hasLSM(list, name string) bool {
	for _, l := range strings.Split(list, ",") {
		if l == name {
			return true
		}
	}
	return false
}

// ProbeBPF reports whether this process may load BPF programs at all (root, BPF syscall).
func ProbeBPF() error {
	if err := features.HaveProgramType(ebpf.CGroupSockAddr); err != nil {
		return err
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		return err
	}
	return m.Close()
}
