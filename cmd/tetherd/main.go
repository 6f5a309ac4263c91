// Command tetherd is tether's host daemon: it enforces per-agent connect and exec rules in the
// kernel, attributes every decision to the agent's SPIFFE identity, and serves the control API.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/daemon"
	"github.com/tether-sh/tether/pkg/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "tetherd:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("tetherd", flag.ContinueOnError)
	configPath := fs.String("config", "", "configuration file (YAML); the embedded defaults when empty")
	removePins := fs.Bool("remove-pins", false, "detach tether's programs, remove its pins (enforcement stops) and exit")
	printDefaults := fs.Bool("print-default-config", false, "print the embedded default configuration and exit")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch {
	case *showVersion:
		fmt.Println(version.String())
		return nil
	case *printDefaults:
		_, err := os.Stdout.Write(config.DefaultYAML)
		return err
	}

	cfg, err := config.Load(*configPath)
	if err != nil {
		return err
	}
	if *removePins {
		return bpffs.RemovePins(cfg.BPF.PinDir)
	}
	log := newLogger(cfg.Log)

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
			next, err := config.Load(*configPath)
			if err != nil {
				log.Error("configuration refused; the running one stays in force", "error", err)
				continue
			}
			if err := d.Reload(ctx, next); err != nil {
				log.Error("reloading", "error", err)
			}
		}
	}()
	err = daemon.Run(ctx, cfg, daemon.Options{Version: version.String(), Logger: log, Started: running.Store})
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
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
