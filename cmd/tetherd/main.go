// Command tetherd is tether's host daemon: it enforces per-agent connect and exec rules in the
// kernel, attributes every decision to the agent's SPIFFE identity, and serves the control API.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"sync/atomic"
	"syscall"

	"github.com/cilium/ebpf/rlimit"
	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/daemon"
	"github.com/tether-sh/tether/pkg/panics"
	"github.com/tether-sh/tether/pkg/version"
)

func main() {
	if err := enterCgroupNamespace(); err != nil {
		fmt.Fprintln(os.Stderr, "tetherd:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "tetherd:", err)
		os.Exit(1)
	}
}

// run runs the tetherd command line args: a subcommand, or the daemon (run) when there is none.
func run(ctx context.Context, args []string) error {
	root := newRoot()
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}

// runDaemon runs tetherd on the configuration at configPath (the embedded defaults when empty)
// until ctx ends.
func runDaemon(ctx context.Context, configPath string) error {
	cfg, err := config.Load(configPath)
	if err != nil {
		return err
	}
	log := newLogger(cfg.Log)
	daemon.TuneGC()
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; on later ones this does nothing.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("raising RLIMIT_MEMLOCK for BPF maps (needs CAP_SYS_RESOURCE on kernels before 5.11): %w", err)
	}

	// SIGHUP reloads the configuration; a broken one is refused and the running one stays.
	var running atomic.Pointer[daemon.Daemon]
	reload := make(chan os.Signal, 1)
	signal.Notify(reload, syscall.SIGHUP)
	defer signal.Stop(reload)
	go func() {
		for range reload {
			d := running.Load()
			if d == nil {
				log.Warn("SIGHUP before tetherd was ready; ignored")
				continue
			}
			next, err := config.Load(configPath)
			if err != nil {
				log.Error("configuration refused; the running one stays in force", "error", err)
				continue
			}
			if err := panics.Run(reloadBoundary, func() error { return d.Reload(ctx, next) }); err != nil {
				log.Error("reloading", "error", err)
			}
		}
	}()
	started := func(d *daemon.Daemon) {
		running.Store(d)
		notify(log, sddaemon.SdNotifyReady+"\nSTATUS=enforcing")
	}
	err = daemon.Run(ctx, cfg, daemon.Options{Version: version.String(), Logger: log, Started: started})
	notify(log, sddaemon.SdNotifyStopping)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// notify tells systemd (a Type=notify unit: $NOTIFY_SOCKET) how tetherd is: READY=1 once the
// programs are attached, every pin is in place and the API serves, so units ordered after
// tetherd start only when enforcement is up; STOPPING=1 when it stops (enforcement stays pinned).
// Without $NOTIFY_SOCKET it does nothing.
func notify(log *slog.Logger, state string) {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		log.Warn("telling systemd (sd_notify)", "state", state, "error", err)
	}
}

// reloadBoundary counts the configuration reloads that panicked (see panics).
var reloadBoundary = panics.Declare("configuration reload")

// cgroupNSEnv names a cgroup namespace file (the DaemonSet sets /proc/1/ns/cgroup, with
// hostPID) that tetherd enters before anything else: in a container's own cgroup namespace,
// /proc/PID/cgroup would name cgroups relative to the container's cgroup, not to the host's
// cgroup2 mount, and agents could not be found from their processes.
const cgroupNSEnv = "TETHER_CGROUPNS"

// enterCgroupNamespace re-executes tetherd in the cgroup namespace $TETHER_CGROUPNS names,
// when it is not in it already. setns applies to one thread; execve from that thread carries it
// to the new image, whose threads all start there.
func enterCgroupNamespace() error {
	target := os.Getenv(cgroupNSEnv)
	if target == "" {
		return nil
	}
	want, err := os.Stat(target)
	if err != nil {
		return fmt.Errorf("%s=%s: %w", cgroupNSEnv, target, err)
	}
	have, err := os.Stat("/proc/self/ns/cgroup")
	if err != nil {
		return fmt.Errorf("reading this process's cgroup namespace: %w", err)
	}
	if os.SameFile(want, have) {
		return nil
	}
	runtime.LockOSThread()
	fd, err := unix.Open(target, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s=%s: %w", cgroupNSEnv, target, err)
	}
	if err := unix.Setns(fd, unix.CLONE_NEWCGROUP); err != nil {
		return fmt.Errorf("entering the cgroup namespace %s (needs CAP_SYS_ADMIN): %w", target, err)
	}
	unix.Close(fd)
	return unix.Exec("/proc/self/exe", os.Args, os.Environ())
}

func newLogger(c config.Log) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
