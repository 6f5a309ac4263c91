package confine

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// Cloneflags are the namespaces the launcher starts the process that calls Run in: a mount and
// a PID namespace unless the profile is Off.
func (p Plan) Cloneflags() uintptr {
	if !p.Confined() {
		return 0
	}
	return unix.CLONE_NEWNS | unix.CLONE_NEWPID
}

// Run carries out plan in the calling process and runs path with argv and env. The process must
// be root, started with plan.Cloneflags() (so, when confined, the first process of its own PID
// namespace, alone in its mount namespace) and not yet in the agent's cgroup: what it does before
// the command starts runs under no agent's rules (an exec of the launcher itself inside the
// agent would need a rule allowing it).
//
// Unconfined, Run executes the command in place and returns only on failure. Confined, it starts
// the command as its only child and stays as the namespace's init: it passes on SIGTERM, SIGHUP,
// SIGUSR1 and SIGUSR2, reaps what is orphaned, and returns the command's exit code (128+n for a
// signal n) once it ends; every process the command left in the namespace ends with it.
//
// refusals, if not nil, is a unix socket: confined, Run sends on it the listener of the seccomp
// filter's notifications (see Supervise), or closes it without one on a kernel that has none for
// this process. The launcher on the other end answers the calls the filter refuses and records
// them.
func Run(plan Plan, path string, argv, env []string, refusals *os.File) (int, error) {
	if err := plan.Validate(); err != nil {
		return 0, err
	}
	// Mounts, the bounding set and the command's start belong to this thread.
	runtime.LockOSThread()
	if plan.Confined() && os.Getpid() != 1 {
		return 0, errors.New("a confined agent must start in a PID namespace of its own (CLONE_NEWPID)")
	}
	// Into the agent's cgroup first ("0" is the writer): from here its rules hold.
	if err := joinCgroup(plan.Cgroup); err != nil {
		return 0, fmt.Errorf("joining the agent's cgroup: %w", err)
	}
	if plan.Confined() {
		if err := mounts(plan); err != nil {
			return 0, err
		}
	}
	if err := credentials(plan); err != nil {
		return 0, err
	}
	// Close-on-exec rather than closed: the Go runtime still uses some until the exec.
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return 0, fmt.Errorf("closing inherited descriptors: %w", err)
	}
	if !plan.Confined() {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return 0, fmt.Errorf("setting no_new_privs: %w", err)
		}
		return 126, fmt.Errorf("executing %s: %w", argv[0], unix.Exec(path, argv, env))
	}
	listener, err := loadFilter(plan.Profile, refusals != nil)
	if err != nil {
		return 0, fmt.Errorf("installing the seccomp filter: %w", err)
	}
	if refusals != nil {
		if listener != nil {
			// Until the launcher has it, a refused call waits.
			err = unix.Sendmsg(int(refusals.Fd()), []byte{0}, unix.UnixRights(int(listener.Fd())), nil, 0)
			listener.Close()
		}
		refusals.Close()
		if err != nil {
			return 0, fmt.Errorf("passing the seccomp listener to the launcher: %w", err)
		}
	}
	return initProcess(path, argv, env)
}

// initProcess starts the command and stays as the PID namespace's init until it ends.
func initProcess(path string, argv, env []string) (int, error) {
	// Caught, so that they are not ignored in the command (signal dispositions are inherited
	// across fork). SIGINT and SIGQUIT come from the terminal, which sent them to the command
	// too; the others are passed on.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGINT, syscall.SIGQUIT)
	pid, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{Env: env, Files: []uintptr{0, 1, 2}})
	if err != nil {
		return 126, fmt.Errorf("starting %s: %w", argv[0], err)
	}
	exited := make(chan syscall.WaitStatus, 1)
	go func() {
		for {
			var ws syscall.WaitStatus
			got, err := syscall.Wait4(-1, &ws, 0, nil)
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			if err != nil {
				// ECHILD: nothing left to wait for, which cannot be before the command ended.
				exited <- syscall.WaitStatus(1 << 8)
				return
			}
			if got == pid {
				exited <- ws
				return
			}
		}
	}()
	for {
		select {
		case s := <-sigs:
			if s != syscall.SIGINT && s != syscall.SIGQUIT {
				syscall.Kill(pid, s.(syscall.Signal))
			}
		case ws := <-exited:
			if ws.Signaled() {
				fmt.Fprintf(os.Stderr, "tetherctl: %s ended by signal %v\n", argv[0], ws.Signal())
				return 128 + int(ws.Signal()), nil
			}
			return ws.ExitStatus(), nil
		}
	}
}

func joinCgroup(dir string) error {
	f, err := os.OpenFile(dir+"/cgroup.procs", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString("0")
	return errors.Join(err, f.Close())
}
