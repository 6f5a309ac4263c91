package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/api"
)

// droppedCaps leave an agent's capability bounding set unless --keep-caps: with them a root
// agent could detach tether's programs (BPF, SYS_ADMIN, PERFMON), open packet sockets the
// address hooks never see (NET_RAW), reconfigure the network (NET_ADMIN), tamper with processes
// outside the agent (SYS_PTRACE) or load kernel code (SYS_MODULE).
var droppedCaps = []uintptr{
	unix.CAP_SYS_ADMIN, unix.CAP_BPF, unix.CAP_PERFMON, unix.CAP_NET_ADMIN, unix.CAP_NET_RAW,
	unix.CAP_SYS_PTRACE, unix.CAP_SYS_MODULE,
}

type runFlags struct {
	id       string
	user     string
	keepCaps bool
	labels   map[string]string
	task     api.TaskRequest
}

func newRun(g *globals) *cobra.Command {
	f := &runFlags{}
	cmd := &cobra.Command{
		Use:   "run --id SPIFFE_ID [--user USER] -- COMMAND [ARGS...]",
		Short: "Run a command as an agent with the given identity",
		Long: `run asks tetherd for a new agent cgroup bound to the identity, then starts COMMAND
directly inside it (clone3 with CLONE_INTO_CGROUP): the agent's rule set is in force before its
first instruction. When COMMAND exits, whatever it left running is killed and the cgroup removed.
tetherctl exits with COMMAND's status.

SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are passed to COMMAND. SIGINT and SIGQUIT from the terminal
reach COMMAND directly; tetherctl itself does not stop for them.

An agent running as root could leave its cgroup (root may write any cgroup.procs): run agents
as an unprivileged user with --user.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.id == "" {
				return errors.New("--id is required")
			}
			return runAgent(g.client(), f, args)
		},
	}
	cmd.Flags().StringVar(&f.id, "id", "", "SPIFFE ID of the agent")
	cmd.Flags().StringVar(&f.user, "user", "", "run COMMAND as this user (name or uid)")
	cmd.Flags().BoolVar(&f.keepCaps, "keep-caps", false, "keep CAP_SYS_ADMIN, CAP_BPF, CAP_NET_RAW and the other capabilities run drops")
	cmd.Flags().StringToStringVar(&f.labels, "label", nil, "labels for the policy (input.agent.labels), key=value")
	cmd.Flags().StringVar(&f.task.Type, "task-type", "", "start the agent with a task of this type")
	cmd.Flags().StringVar(&f.task.Sensitivity, "sensitivity", "", "the task's data sensitivity")
	cmd.Flags().StringVar(&f.task.TTL, "ttl", "2m", "the task (and its credential) ends unless a heartbeat renews it within this; run sends one every third of it")
	cmd.Flags().StringVar(&f.task.TTL, "task-ttl", "2m", "the same as --ttl")
	return cmd
}

func runAgent(c *api.Client, f *runFlags, args []string) error {
	if os.Geteuid() != 0 {
		// CLONE_INTO_CGROUP needs write access to cgroup.procs up to the common ancestor of
		// both cgroups, the cgroup2 root; launching as another user needs tetherd to move the
		// process, which is not there yet.
		return errors.New("tetherctl run needs root (it starts COMMAND inside the agent's cgroup); use --user to run COMMAND as another user")
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

	req := api.RegisterRequest{SpiffeID: f.id, Launch: true, Labels: f.labels}
	if cred != nil {
		req.UID = &cred.Uid
	}
	var taskTTL time.Duration
	if f.task.Type != "" {
		req.Task = &f.task
		if taskTTL, err = time.ParseDuration(f.task.TTL); err != nil {
			return fmt.Errorf("--task-ttl: %w", err)
		}
	}
	agent, err := c.Register(req)
	if err != nil {
		return err
	}
	unregister := func() {
		if err := c.Unregister(agent.Slot); err != nil {
			fmt.Fprintf(os.Stderr, "tetherctl: removing agent %d: %v (tetherd removes it once it sees it ended)\n", agent.Slot, err)
		}
	}
	dir, err := os.Open(agent.Cgroup)
	if err != nil {
		unregister()
		return fmt.Errorf("opening agent cgroup: %w", err)
	}
	defer dir.Close()

	cmd := exec.Command(path, args[1:]...)
	cmd.Args[0] = args[0]
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), "TETHER_SPIFFE_ID="+agent.SpiffeID, "TETHER_AGENT_SLOT="+strconv.Itoa(int(agent.Slot)))
	stopHeartbeats := make(chan struct{})
	defer close(stopHeartbeats)
	if agent.Task != nil {
		// The task's credential is in a file only COMMAND's uid can read; it renews only while
		// this launcher sends heartbeats.
		taskCred, err := c.TaskCredential(agent.Slot)
		if err != nil {
			unregister()
			return fmt.Errorf("task credential: %w", err)
		}
		cmd.Env = append(cmd.Env, "TETHER_TASK_ID="+agent.Task.ID, "TETHER_TASK_CREDENTIAL_FILE="+taskCred.File)
		go supervise(c, agent.Slot, taskCred, taskTTL, stopHeartbeats)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd()), Credential: cred}

	// Caught, not ignored: an ignored signal would stay ignored in COMMAND across exec.
	terminal := make(chan os.Signal, 4)
	signal.Notify(terminal, syscall.SIGINT, syscall.SIGQUIT)
	defer signal.Stop(terminal)
	forward := make(chan os.Signal, 4)
	signal.Notify(forward, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(forward)

	if err := start(cmd, !f.keepCaps); err != nil {
		unregister()
		return fmt.Errorf("starting %s: %w", args[0], err)
	}
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
	unregister()

	var ee *exec.ExitError
	switch {
	case waitErr == nil:
		return nil
	case errors.As(waitErr, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fmt.Fprintf(os.Stderr, "tetherctl: %s ended by signal %v\n", args[0], ws.Signal())
			return exitCode(128 + int(ws.Signal()))
		}
		return exitCode(ee.ExitCode())
	}
	return waitErr
}

// start starts cmd from a thread whose capability bounding set lacks droppedCaps (a bounding set
// belongs to a thread and is inherited by the child). That thread is never given back to the
// Go scheduler: it ends with the goroutine.
func start(cmd *exec.Cmd, dropCaps bool) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread's reduced capabilities die with it
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			errc <- fmt.Errorf("clearing ambient capabilities: %w", err)
			return
		}
		if dropCaps {
			for _, c := range droppedCaps {
				if err := unix.Prctl(unix.PR_CAPBSET_DROP, c, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
					if os.Geteuid() == 0 {
						errc <- fmt.Errorf("dropping capability %d: %w", c, err)
						return
					}
					break // without CAP_SETPCAP there are no capabilities to drop
				}
			}
		}
		errc <- cmd.Start()
	}()
	return <-errc
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
