package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/dataplane"
)

type runFlags struct {
	id        string
	user      string
	allowRoot bool
	shareUID  bool
	keepCaps  bool
	labels    map[string]string
	task      api.TaskRequest
}

func newRun(g *globals) *cobra.Command {
	f := &runFlags{}
	cmd := &cobra.Command{
		Use:   "run --id SPIFFE_ID [--user USER | --allow-root] -- COMMAND [ARGS...]",
		Short: "Run a command as an agent with the given identity, confined",
		Long: `run asks tetherd for a new agent cgroup bound to the identity and for the agent's
confinement, then starts COMMAND in it: the agent's rule set is in force before COMMAND's first
instruction. When COMMAND exits, whatever it left running is killed and the cgroup removed.
tetherctl exits with COMMAND's status.

COMMAND runs as a uid of its own (tetherd's confinement.uids; no other live agent, user or
process has it), or as --user (refused if another live agent runs as that user, unless
--share-uid), or as root with --allow-root, which a launch rule with root: true must allow.
It has no_new_privs, no descriptors but 0-2, the environment tetherctl was given plus the
TETHER_* variables below, and, unless the policy's grants say sandbox: off (which a launch rule
with unconfined: true must allow):
  - a mount namespace without bpffs, with the cgroup trees and the granted executables
    read-only and tether's admin socket, key and state, the SPIRE and container runtime
    sockets and the other agents' credentials hidden;
  - a PID namespace of its own: no other process of the host to signal, trace or read;
  - a seccomp filter (bpf, mount, namespaces, ptrace, process_vm_*, pidfd_getfd, kexec,
    modules, perf_event_open, userfaultfd, and sockets other than unix, IPv4, IPv6 and
    routing netlink are refused; the strict profile refuses io_uring, keyrings and more).

COMMAND gets TETHER_SPIFFE_ID and TETHER_AGENT_SLOT, and with a task TETHER_TASK_ID and
TETHER_TASK_CREDENTIAL_FILE.

SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are passed to COMMAND. SIGINT and SIGQUIT from the terminal
reach COMMAND directly; tetherctl itself does not stop for them.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			switch {
			case f.id == "":
				return errors.New("--id is required")
			case f.allowRoot && f.user != "":
				return errors.New("--allow-root runs COMMAND as root and --user as another user: give one of them")
			case f.keepCaps && !f.allowRoot:
				return errors.New("--keep-caps keeps a root agent's capabilities: it needs --allow-root")
			}
			return runAgent(g.client(), f, args)
		},
	}
	cmd.Flags().StringVar(&f.id, "id", "", "SPIFFE ID of the agent")
	cmd.Flags().StringVar(&f.user, "user", "", "run COMMAND as this user (name or uid) rather than as a uid of its own")
	cmd.Flags().BoolVar(&f.shareUID, "share-uid", false, "run as --user even if another live agent runs as that user")
	cmd.Flags().BoolVar(&f.allowRoot, "allow-root", false, "run COMMAND as root (a launch rule with root: true must allow it)")
	cmd.Flags().BoolVar(&f.keepCaps, "keep-caps", false, "with --allow-root, keep CAP_SYS_ADMIN, CAP_BPF, CAP_NET_RAW and the other capabilities run drops (a launch rule with unconfined: true must allow it)")
	cmd.Flags().StringToStringVar(&f.labels, "label", nil, "labels for the policy (input.agent.labels), key=value")
	cmd.Flags().StringVar(&f.task.Type, "task-type", "", "start the agent with a task of this type")
	cmd.Flags().StringVar(&f.task.Sensitivity, "sensitivity", "", "the task's data sensitivity")
	cmd.Flags().StringVar(&f.task.TTL, "ttl", "2m", "the task (and its credential) ends unless a heartbeat renews it within this; run sends one every third of it")
	cmd.Flags().StringVar(&f.task.TTL, "task-ttl", "2m", "the same as --ttl")
	expect(cmd, "id", kindSPIFFEID)
	expect(cmd, "ttl", kindDuration)
	expect(cmd, "task-ttl", kindDuration)
	expect(cmd, "sensitivity", "public", "internal", "confidential", "restricted")
	return cmd
}

func runAgent(c *api.Client, f *runFlags, args []string) error {
	if os.Geteuid() != 0 {
		// The namespaces, the move into the agent's cgroup and the agent's uid all need root.
		return errors.New("tetherctl run needs root (it confines COMMAND and starts it in the agent's cgroup as the agent's uid)")
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		return err
	}
	var cred *syscall.Credential
	if f.user != "" {
		if cred, err = credential(f.user); err != nil {
			return err
		}
	}
	agent, taskTTL, err := registerLaunch(c, f, cred)
	if err != nil {
		return err
	}
	unregister := func() {
		if err := c.Unregister(agent.Slot); err != nil {
			fmt.Fprintf(os.Stderr, "tetherctl: removing agent %d: %v (tetherd removes it once it sees it ended)\n", agent.Slot, err)
		}
	}
	plan, err := launchPlan(c, f, agent, cred)
	if err != nil {
		unregister()
		return err
	}
	stopHeartbeats := make(chan struct{})
	defer close(stopHeartbeats)
	env, err := agentEnv(c, agent, taskTTL, stopHeartbeats)
	if err != nil {
		unregister()
		return err
	}
	waitErr, err := startAndWait(c, agent.Slot, plan, env, path, args)
	unregister()
	if err != nil {
		return err
	}
	return exitStatus(args[0], waitErr)
}

// registerLaunch registers the agent to launch, with its task if --task-type names one.
func registerLaunch(c *api.Client, f *runFlags, cred *syscall.Credential) (agents.Agent, time.Duration, error) {
	req := api.RegisterRequest{SpiffeID: f.id, Launch: true, Labels: f.labels, AllowRoot: f.allowRoot, ShareUID: f.shareUID}
	if cred != nil {
		req.UID = &cred.Uid
	}
	var taskTTL time.Duration
	if f.task.Type != "" {
		req.Task = &f.task
		var err error
		if taskTTL, err = time.ParseDuration(f.task.TTL); err != nil {
			return agents.Agent{}, 0, fmt.Errorf("--task-ttl: %w", err)
		}
	}
	agent, err := c.Register(req)
	return agent, taskTTL, err
}

// launchPlan asks tetherd how to confine the agent, and says what root can still do when it
// runs as root.
func launchPlan(c *api.Client, f *runFlags, agent agents.Agent, cred *syscall.Credential) (confine.Plan, error) {
	plan, err := c.Confinement(agent.Slot, f.keepCaps)
	if err != nil {
		return plan, fmt.Errorf("confinement of agent %d: %w", agent.Slot, err)
	}
	if cred != nil && plan.UID == cred.Uid {
		plan.GID, plan.Groups = cred.Gid, cred.Groups
	}
	if plan.UID == 0 {
		fmt.Fprintf(os.Stderr, "tetherctl: agent %d runs as root (sandbox %s); root can still:\n", agent.Slot, plan.Profile)
		for _, what := range confine.RootCan {
			fmt.Fprintf(os.Stderr, "  - %s\n", what)
		}
	}
	return plan, nil
}

// agentEnv is COMMAND's environment: the caller's, and tether's variables (set here, not
// inherited). With a task it starts the heartbeats that renew it, until stop is closed.
func agentEnv(c *api.Client, agent agents.Agent, taskTTL time.Duration, stop chan struct{}) ([]string, error) {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		name, _, _ := strings.Cut(kv, "=")
		return slices.Contains([]string{"TETHER_SPIFFE_ID", "TETHER_AGENT_SLOT", "TETHER_TASK_ID", "TETHER_TASK_CREDENTIAL_FILE"}, name)
	})
	env = append(env, "TETHER_SPIFFE_ID="+agent.SpiffeID, "TETHER_AGENT_SLOT="+strconv.Itoa(int(agent.Slot)))
	if agent.Task != nil {
		// The task's credential is in a file only COMMAND's uid can read; it renews only while
		// this launcher sends heartbeats (or the agent renews it itself, presenting it).
		taskCred, err := c.TaskCredential(agent.Slot)
		if err != nil {
			return nil, fmt.Errorf("task credential: %w", err)
		}
		env = append(env, "TETHER_TASK_ID="+agent.Task.ID, "TETHER_TASK_CREDENTIAL_FILE="+taskCred.File)
		go supervise(c, agent.Slot, taskCred, taskTTL, stop)
	}
	return env, nil
}

// startAndWait starts tetherctl again, as the process that confines itself and becomes COMMAND
// (or, confined, the init of COMMAND's PID namespace), hands it the plan on descriptor 3,
// forwards signals to it, and waits for it and for the last refusals its filter reported. It
// returns how COMMAND ended, or why it could not start.
func startAndWait(c *api.Client, slot dataplane.Slot, plan confine.Plan, env []string, path string, args []string) (ended, err error) {
	planR, planW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	// Descriptor 4: where the stage passes the listener of its seccomp filter's notifications.
	refusalsOurs, refusalsTheirs, err := socketPair()
	if err != nil {
		planR.Close()
		planW.Close()
		return nil, err
	}
	defer refusalsOurs.Close()
	supervised := make(chan struct{})
	cmd := exec.Command("/proc/self/exe", append([]string{confineStage, path}, args...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{planR, refusalsTheirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: plan.Cloneflags()}

	// Caught, not ignored: an ignored signal would stay ignored in COMMAND across exec.
	terminal := make(chan os.Signal, 4)
	signal.Notify(terminal, syscall.SIGINT, syscall.SIGQUIT)
	defer signal.Stop(terminal)
	forward := make(chan os.Signal, 4)
	signal.Notify(forward, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(forward)

	err = cmd.Start()
	planR.Close()
	refusalsTheirs.Close()
	if err != nil {
		planW.Close()
		return nil, fmt.Errorf("starting %s: %w", args[0], err)
	}
	if plan.Confined() {
		go superviseFilter(c, slot, refusalsOurs, supervised)
	} else {
		close(supervised)
	}
	// A plan can be larger than a pipe holds: written while the stage reads it.
	go func() {
		json.NewEncoder(planW).Encode(plan)
		planW.Close()
	}()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var waitErr error
	for waiting := true; waiting; {
		select {
		case s := <-forward:
			cmd.Process.Signal(s)
		case <-terminal:
			// The terminal sent it to COMMAND's process group as well.
		case waitErr = <-done:
			waiting = false
		}
	}
	// The last refusals are recorded while the agent is still registered.
	select {
	case <-supervised:
	case <-time.After(5 * time.Second):
	}
	return waitErr, nil
}

// exitStatus is tetherctl run's answer for how COMMAND (named name) ended: its exit code, or
// 128 + the signal that ended it.
func exitStatus(name string, waitErr error) error {
	var ee *exec.ExitError
	switch {
	case waitErr == nil:
		return nil
	case errors.As(waitErr, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fmt.Fprintf(os.Stderr, "tetherctl: %s ended by signal %v\n", name, ws.Signal())
			return exitCode(128 + int(ws.Signal()))
		}
		return exitCode(ee.ExitCode())
	}
	return waitErr
}

// confineStage is the hidden first argument of the process run starts to confine the agent.
const confineStage = "__confine"

// confineAndRun is that process: it reads the plan from descriptor 3, carries it out and runs
// COMMAND (args: its path, then its argv).
func confineAndRun(args []string) int {
	planFile := os.NewFile(3, "plan")
	plan, err := confine.Read(planFile)
	planFile.Close()
	if err == nil && len(args) < 2 {
		err = errors.New("no command")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tetherctl: confining the agent:", err)
		return 125
	}
	refusals := os.NewFile(4, "refusals")
	code, err := confine.Run(plan, args[0], args[1:], os.Environ(), refusals)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tetherctl: confining the agent:", err)
		if code == 0 {
			code = 125
		}
	}
	return code
}

func credential(name string) (*syscall.Credential, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if _, numErr := strconv.Atoi(name); numErr == nil {
			u, err = user.LookupId(name)
		}
		if err != nil {
			return nil, fmt.Errorf("user %q: %w", name, err)
		}
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("user %q: %w", name, err)
	}
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	gids, err := u.GroupIds()
	if err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				cred.Groups = append(cred.Groups, uint32(n))
			}
		}
	}
	return cred, nil
}

func socketPair() (ours, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "refusals"), os.NewFile(uintptr(fds[1]), "refusals"), nil
}

// superviseFilter takes the listener of the confined agent's seccomp filter from the stage, on
// sock, answers every call the filter refuses (it fails as it would without a listener) and
// reports it to tetherd, which records it. The agent cannot reach this process: it is outside
// the agent's PID namespace, runs as root, and the listener never enters the agent.
// It closes done once every refusal it saw is reported (or dropped).
func superviseFilter(c *api.Client, slot dataplane.Slot, sock *os.File, done chan<- struct{}) {
	defer close(done)
	buf, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(int(sock.Fd()), buf, oob, unix.MSG_CMSG_CLOEXEC)
	var listener *os.File
	if err == nil && oobn > 0 {
		if msgs, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil && len(msgs) == 1 {
			if fds, perr := unix.ParseUnixRights(&msgs[0]); perr == nil && len(fds) == 1 {
				listener = os.NewFile(uintptr(fds[0]), "seccomp listener")
			}
		}
	}
	if listener == nil {
		// The stage ended before its filter, or the kernel gives no listener to a process with
		// threads (before Linux 5.7): refused calls fail all the same, unrecorded.
		if err != nil {
			fmt.Fprintf(os.Stderr, "tetherctl: agent %d: no seccomp listener (%v): refused calls are not recorded\n", slot, err)
		}
		return
	}
	defer listener.Close()
	// Reports go out in order, one at a time; a burst beyond the queue is counted, not held.
	reports := make(chan confine.Refusal, 256)
	var dropped atomic.Int64
	reported := make(chan struct{})
	defer func() { <-reported }()
	go func() {
		defer close(reported)
		for r := range reports {
			req := api.RefusalRequest{PID: r.PID, Syscall: r.Syscall, Detail: r.String(), Errno: unix.ErrnoName(r.Errno)}
			if err := c.RecordRefusal(slot, req); err != nil {
				fmt.Fprintf(os.Stderr, "tetherctl: agent %d: recording refused %s: %v\n", slot, r, err)
			}
		}
	}()
	err = confine.Supervise(listener, func(r confine.Refusal) {
		select {
		case reports <- r:
		default:
			dropped.Add(1)
		}
	})
	close(reports)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tetherctl: agent %d: %v\n", slot, err)
	}
	if n := dropped.Load(); n > 0 {
		fmt.Fprintf(os.Stderr, "tetherctl: agent %d: %d refused calls came too fast to record\n", slot, n)
	}
}
