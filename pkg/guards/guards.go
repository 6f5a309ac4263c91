// Package guards finishes in user space what tether's kernel guards began: a granted executable
// denied because it changed is granted again when its content is still the granted one; a file
// a rule grants by content alone is learnt from its digest; an agent process moved out of its
// agent that the kernel could not kill is killed here.
package guards

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// Guards follows up the kernel guards' denials.
type Guards struct {
	// Files and Integrity are the compiler's: the files a rule grants by content are learnt
	// into Integrity.
	Files     compile.Files
	Integrity *compile.Integrity
	// Recompile asks for the agents' grants to be compiled again soon (it must not block).
	Recompile func()
	// Observe counts a guard's denial (tether_guard_denials_total).
	Observe func(events.Decision)
	Log     *slog.Logger

	learn chan events.Decision // denied execs to check against rules by content (Run)
}

// New returns the guards' follow-up; Run learns contents until its ctx ends.
func New(files compile.Files, integrity *compile.Integrity, recompile func(), observe func(events.Decision), log *slog.Logger) *Guards {
	return &Guards{Files: files, Integrity: integrity, Recompile: recompile, Observe: observe, Log: log, learn: make(chan events.Decision, 64)}
}

// FollowUp counts a guard's denial and finishes in user space what a kernel guard began: a granted executable denied
// because it changed is granted again when its content is still the granted one (the agents'
// grants are compiled again, which checks its digest); an agent process moved out of its agent
// that the kernel could not kill (moved by another process, before Linux 6.13) is killed here.
func (g *Guards) FollowUp(rec *events.Decision) {
	g.Observe(*rec)
	switch {
	case rec.Kind == events.KernelKind(dataplane.KindExec) && rec.Reason == events.KernelReason(dataplane.ReasonModifiedFile):
		g.Recompile()
	case rec.Kind == events.KernelKind(dataplane.KindExec) && rec.Reason == events.KernelReason(dataplane.ReasonNoRule) &&
		rec.Executable != "" && g.Integrity.Wants():
		// Maybe a file a rule grants by content alone: worth its digest (off the event path).
		select {
		case g.learn <- *rec:
		default:
			g.Log.Warn("too many execs to check against the rules by content; this one is not", "executable", rec.Executable, "pid", rec.PID)
		}
	case rec.Kind == events.KernelKind(dataplane.KindMigrate) && rec.Verdict == events.VerdictDeny && !rec.Killed &&
		strings.HasPrefix(rec.Cgroup, "/"):
		// A move that happened (the tracepoint's record names the cgroup's path; a BPF LSM
		// refusal names a directory: nothing moved).
		if err := killMoved(int(rec.PID), rec.Cgroup); err != nil {
			g.Log.Error("an agent process left its agent and could not be killed", "pid", rec.PID, "cgroup", rec.Cgroup, "error", err)
			return
		}
		rec.Killed = true
	}
}

// Run takes the digest of each file an agent was denied executing while some rule grants
// by content alone, and compiles the grants again when one has such content: its next exec runs.
// The file is found by the path the agent passed, in the view of the process (or of its parent,
// when the kernel killed it), and must be the file the kernel saw.
func (g *Guards) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case rec := <-g.learn:
			id, ok := events.ParseFileID(rec.BinaryFile)
			if !ok {
				continue
			}
			pids := []uint32{rec.PID}
			for _, p := range rec.ParentChain {
				pids = append(pids, p.PID)
			}
			for _, pid := range pids {
				path := fmt.Sprintf("/proc/%d/root%s", pid, rec.Executable)
				if !filepath.IsAbs(rec.Executable) {
					path = fmt.Sprintf("/proc/%d/cwd/%s", pid, rec.Executable)
				}
				learnt, err := g.Integrity.Learn(g.Files, path, id)
				if err != nil {
					continue // gone, or another file there: the next in the chain
				}
				if learnt {
					g.Log.Info("a file with content a rule grants: granting it", "executable", rec.Executable, "file", rec.BinaryFile)
					g.Recompile()
				}
				break
			}
		}
	}
}

// killMoved kills process pid if it is still in the cgroup it was moved to (relative to the
// cgroup2 root, as the kernel recorded it): a pidfd pins the process, so a PID reused since is
// never hit.
func killMoved(pid int, cgroup string) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil // gone already
	}
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(fd)
	now, err := cgroups.PathOf(pid)
	if err != nil {
		return nil // ended meanwhile
	}
	if now != cgroup {
		return fmt.Errorf("process %d is in %s, not in %s where the kernel saw it go: not the same process, or moved again", pid, now, cgroup)
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("pidfd_send_signal: %w", err)
	}
	return nil
}
