// Package confine is the launcher's wall around an agent that `tetherctl run` starts. tetherd
// decides a Plan (the agent's uid, its sandbox profile, what to hide and what to make read-only);
// Run carries it out in the process that becomes the agent, before the agent's command runs:
// in a mount and PID namespace of its own it hides tether's machinery (the bpffs that holds the
// pins, the admin and SPIRE sockets, tether's key, the other agents' credentials), makes the
// cgroup trees and the granted executables read-only, moves into the agent's cgroup, takes the
// agent's uid, sets no_new_privs, marks every descriptor but 0-2 close-on-exec, installs a
// seccomp filter and starts the command as the only child of a minimal init. The kernel hooks
// are the next wall, not this one.
package confine

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// Profile is how far the launcher confines an agent: the policy's grants name one per task type
// (`sandbox`), Default when they do not.
type Profile string

const (
	// Strict is Default with a longer seccomp deny list (io_uring, keyrings, personality, ...).
	Strict Profile = "strict"
	// Default: own mount and PID namespaces (no bpffs, read-only cgroup trees and granted
	// executables, tether's sockets hidden, no other process visible), the seccomp filter,
	// no_new_privs, the agent's uid.
	Default Profile = "default"
	// Off: only the uid, no_new_privs and the closed descriptors; needs a launch rule that
	// allows it (launch[].unconfined, an admin's).
	Off Profile = "off"
)

// ParseProfile accepts strict, default and off; "" is default.
func ParseProfile(s string) (Profile, error) {
	switch p := Profile(s); p {
	case Strict, Default, Off:
		return p, nil
	case "":
		return Default, nil
	}
	return "", fmt.Errorf("sandbox %q: want strict, default or off", s)
}

// Plan is what the launcher does to one agent before it runs the agent's command.
type Plan struct {
	Profile Profile `json:"profile"`
	// Cgroup is the agent's cgroup directory: the launcher moves into it just before it starts
	// the command (the cgroup trees are read-only to the command).
	Cgroup string   `json:"cgroup"`
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"`
	// Hide are files (tether's admin socket, the SPIRE sockets, the container runtimes'
	// sockets, tether's signing key) over which an empty file is mounted, and directories over
	// which an empty read-only tmpfs is: the agent cannot reach what they were.
	Hide []string `json:"hide,omitempty"`
	// ReadOnly are the executables the agent may run: each is mounted read-only over itself, so
	// the agent cannot rewrite what a rule allows by its (device, inode).
	ReadOnly []string `json:"read_only,omitempty"`
	// CredentialDir holds one directory per agent with its task credential; the agent sees an
	// empty read-only tmpfs there with only its own directory, Credentials, in it.
	CredentialDir string `json:"credential_dir,omitempty"`
	Credentials   string `json:"credentials,omitempty"`
	// KeepCaps keeps a root agent's capability bounding set whole (tetherctl run --keep-caps).
	KeepCaps bool `json:"keep_caps,omitempty"`
}

// Confined reports whether the plan gives the agent namespaces and the filter.
func (p Plan) Confined() bool { return p.Profile != Off }

// Validate says what is wrong with a plan.
func (p Plan) Validate() error {
	if _, err := ParseProfile(string(p.Profile)); err != nil {
		return err
	}
	if !filepath.IsAbs(p.Cgroup) {
		return fmt.Errorf("confinement plan: cgroup %q is not an absolute path", p.Cgroup)
	}
	for _, list := range [][]string{p.Hide, p.ReadOnly, {p.CredentialDir, p.Credentials}} {
		for _, path := range list {
			if path != "" && !filepath.IsAbs(path) {
				return fmt.Errorf("confinement plan: %q is not an absolute path", path)
			}
		}
	}
	if p.Credentials != "" && filepath.Dir(p.Credentials) != filepath.Clean(p.CredentialDir) {
		return fmt.Errorf("confinement plan: credentials %q are not in %q", p.Credentials, p.CredentialDir)
	}
	if p.UID != 0 && p.KeepCaps {
		return errors.New("confinement plan: keep_caps is for root agents")
	}
	return nil
}

// Read reads a plan (JSON) from r.
func Read(r io.Reader) (Plan, error) {
	var p Plan
	d := json.NewDecoder(io.LimitReader(r, 1<<20))
	d.DisallowUnknownFields()
	if err := d.Decode(&p); err != nil {
		return p, fmt.Errorf("reading the confinement plan: %w", err)
	}
	return p, p.Validate()
}

// DroppedCaps leave a root agent's capability bounding set unless KeepCaps: with them it could
// load programs (BPF, PERFMON), mount and administer (SYS_ADMIN), open packet sockets the
// address hooks never see (NET_RAW), reconfigure the network (NET_ADMIN), tamper with other
// processes (SYS_PTRACE), load kernel code (SYS_MODULE), reach raw devices and memory
// (SYS_RAWIO, MKNOD), open files by handle (DAC_READ_SEARCH), or make files immutable,
// reboot, set the clock, read the kernel log and steer the audit and MAC subsystems.
var DroppedCaps = []uintptr{
	unix.CAP_SYS_ADMIN, unix.CAP_BPF, unix.CAP_PERFMON, unix.CAP_NET_ADMIN, unix.CAP_NET_RAW,
	unix.CAP_SYS_PTRACE, unix.CAP_SYS_MODULE, unix.CAP_SYS_RAWIO, unix.CAP_MKNOD, unix.CAP_DAC_READ_SEARCH,
	unix.CAP_LINUX_IMMUTABLE, unix.CAP_SYS_BOOT, unix.CAP_SYS_TIME, unix.CAP_SYSLOG, unix.CAP_AUDIT_CONTROL,
	unix.CAP_MAC_ADMIN, unix.CAP_MAC_OVERRIDE, unix.CAP_SETPCAP,
}

// RootCan is what a root agent can still do under the default profile, for tetherctl run
// --allow-root to print.
var RootCan = []string{
	"read and write every file its mount namespace shows (only the granted executables, the cgroup trees and tether's own files are read-only or hidden), including other root agents' files",
	"bind ports below 1024 and change file ownership, modes and capabilities",
	"with --keep-caps, everything the capabilities allow (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_RAW, ...)",
}

// credentials gives the calling process the agent's uid, gid and groups, with an empty
// capability bounding set; a root agent keeps uid 0 with DroppedCaps out of its bounding set
// (unless KeepCaps).
func credentials(plan Plan) error {
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clearing ambient capabilities: %w", err)
	}
	if plan.UID == 0 {
		if err := syscall.Setgroups([]int{}); err != nil {
			return fmt.Errorf("dropping supplementary groups: %w", err)
		}
		if plan.KeepCaps {
			return nil
		}
		// A bounding set belongs to a thread: this one, locked, starts the command.
		for _, c := range DroppedCaps {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("dropping capability %d: %w", c, err)
			}
		}
		return nil
	}
	// Nothing to gain with no_new_privs, but an empty bounding set says so to every reader.
	for c := 0; ; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); errors.Is(err, unix.EINVAL) {
			break // past the last capability this kernel has
		} else if err != nil {
			return fmt.Errorf("dropping capability %d: %w", c, err)
		}
	}
	groups := make([]int, len(plan.Groups))
	for i, g := range plan.Groups {
		groups[i] = int(g)
	}
	// x/sys/unix's credential calls change one thread; the syscall package's change every thread
	// of the process (Go 1.16+, with or without cgo).
	if err := errors.Join(syscall.Setgroups(groups), syscall.Setresgid(int(plan.GID), int(plan.GID), int(plan.GID)),
		syscall.Setresuid(int(plan.UID), int(plan.UID), int(plan.UID))); err != nil {
		return fmt.Errorf("taking the agent's uid %d: %w", plan.UID, err)
	}
	return nil
}
