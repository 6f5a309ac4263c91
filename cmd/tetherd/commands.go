package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/kernel"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/version"
)

// newRoot is tetherd's command line: `tetherd [--config FILE]` runs the daemon (as `tetherd run`
// does); the other commands look at the node or the configuration and exit. The flags of the
// earlier command line (--remove-pins, --print-default-config, --version) still work.
func newRoot() *cobra.Command {
	var configPath string
	var removePins, printDefaults, showVersion bool
	root := &cobra.Command{
		Use:   "tetherd [--config FILE]",
		Short: "tether's host daemon: runtime policy for AI agents, enforced in the kernel",
		Long: `tetherd attributes every connect and exec of an agent process to the agent's SPIFFE identity,
decides with OPA from the agent's live context, enforces the decision in the kernel (cgroup socket
hooks, exec hooks), exports decision records and metrics, and serves the control API tetherctl
talks to. Without a command it runs the daemon, as "tetherd run" does.`,
		Example: `  sudo tetherd probe                              # can this node run tether?
  tetherd check-config /etc/tether/tetherd.yaml   # is this configuration (and its policy) valid?
  sudo tetherd --config /etc/tether/tetherd.yaml  # run the daemon`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case showVersion:
				return printVersion(cmd.OutOrStdout())
			case printDefaults:
				return printDefaultConfig(cmd.OutOrStdout())
			case removePins:
				return removePinsOf(configPath)
			}
			return runDaemon(cmd.Context(), configPath)
		},
	}
	root.PersistentFlags().StringVar(&configPath, "config", "", "configuration file (YAML); the embedded defaults when empty")
	root.Flags().BoolVar(&removePins, "remove-pins", false, "the same as `tetherd remove-pins`")
	root.Flags().BoolVar(&printDefaults, "print-default-config", false, "the same as `tetherd default-config`")
	root.Flags().BoolVar(&showVersion, "version", false, "the same as `tetherd version`")

	root.AddCommand(
		&cobra.Command{
			Use:     "run",
			Short:   "Run the daemon (the default)",
			Example: "  sudo tetherd run --config /etc/tether/tetherd.yaml",
			Args:    cobra.NoArgs,
			RunE:    func(cmd *cobra.Command, _ []string) error { return runDaemon(cmd.Context(), configPath) },
		},
		newProbe(&configPath),
		newCheckConfig(&configPath),
		newTailLog(),
		&cobra.Command{
			Use:     "remove-pins",
			Short:   "Detach tether's programs and remove its pins (enforcement stops), then exit",
			Long:    "remove-pins removes what tetherd pinned under bpf.pin_dir: the programs detach and every agent is\nunenforced until tetherd starts again. For uninstalling, or after an incompatible upgrade.",
			Example: "  sudo tetherd remove-pins --config /etc/tether/tetherd.yaml",
			Args:    cobra.NoArgs,
			RunE:    func(*cobra.Command, []string) error { return removePinsOf(configPath) },
		},
		&cobra.Command{
			Use:     "default-config",
			Short:   "Print the embedded default configuration",
			Example: "  tetherd default-config > /etc/tether/tetherd.yaml",
			Args:    cobra.NoArgs,
			RunE:    func(cmd *cobra.Command, _ []string) error { return printDefaultConfig(cmd.OutOrStdout()) },
		},
		&cobra.Command{
			Use:     "version",
			Short:   "Print the version",
			Example: "  tetherd version",
			Args:    cobra.NoArgs,
			RunE:    func(cmd *cobra.Command, _ []string) error { return printVersion(cmd.OutOrStdout()) },
		},
	)
	return root
}

func printVersion(w io.Writer) error {
	_, err := fmt.Fprintln(w, version.String())
	return err
}

func printDefaultConfig(w io.Writer) error {
	_, err := w.Write(config.DefaultYAML)
	return err
}

func removePinsOf(configPath string) error {
	cfg, err := config.Load(configPath)
	if err != nil {
		return err
	}
	return bpffs.RemovePins(cfg.BPF.PinDir)
}

// checkOutput refuses an output format other than text and json.
func checkOutput(format string) error {
	if format != "text" && format != "json" {
		return fmt.Errorf("output format %q: want text or json", format)
	}
	return nil
}

func newProbe(configPath *string) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "probe [-o text|json]",
		Short: "Check what tetherd needs from this node, and say how to fix what is missing",
		Long: `probe checks the node: cgroup v2, BTF, the BPF program and map types tether loads, bpffs at
bpf.pin_dir, the cgroup freezer and cgroup.kill, and BPF LSM (optional). It changes only what
tetherd itself would (it may mount bpffs and securityfs) and one probe cgroup it creates and
removes. It exits 1 when a requirement is missing.`,
		Example: `  sudo tetherd probe
  sudo tetherd probe -o json | jq '.requirements[] | select(.ok | not)'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			cfg, err := config.Load(*configPath)
			if err != nil {
				return err
			}
			return probeNode(cmd.OutOrStdout(), cfg.Cgroup.Root, cfg.BPF.PinDir, output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	return cmd
}

// probeReport is `tetherd probe -o json`.
type probeReport struct {
	OK           bool                 `json:"ok"` // every required one is there
	CgroupRoot   string               `json:"cgroup_root,omitempty"`
	Requirements []kernel.Requirement `json:"requirements"`
}

// probeNode prints what tetherd needs from this node and whether it is there, and fails when a
// requirement is missing.
func probeNode(w io.Writer, cgroupRoot, pinDir, output string) error {
	var cgErr error
	if cgroupRoot == "" {
		cgroupRoot, cgErr = cgroups.Mount()
	}
	rep := probeReport{OK: true, CgroupRoot: cgroupRoot, Requirements: kernel.Requirements(cgroupRoot, cgErr, pinDir)}
	missing := 0
	for _, r := range rep.Requirements {
		if !r.OK && r.Required {
			missing++
		}
	}
	rep.OK = missing == 0
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		for _, r := range rep.Requirements {
			status := "ok"
			switch {
			case !r.OK && r.Required:
				status = "MISSING"
			case !r.OK:
				status = "absent (optional)"
			}
			fmt.Fprintf(w, "%-54s %-18s %s\n", r.Name, status, r.Detail)
			if r.Fix != "" {
				fmt.Fprintf(w, "%-54s %-18s fix: %s\n", "", "", r.Fix)
			}
		}
	}
	if missing > 0 {
		return fmt.Errorf("%d requirement(s) missing: tether cannot run on this node", missing)
	}
	if output == "text" {
		fmt.Fprintln(w, "tether can run on this node")
	}
	return nil
}

func newCheckConfig(configPath *string) *cobra.Command {
	return &cobra.Command{
		Use:   "check-config [FILE]",
		Short: "Validate a configuration file and the policy it names, offline, and exit",
		Long: `check-config validates FILE (else --config, else the embedded defaults) as tetherd would at start:
every setting, with file:line for each error; then the policy it names (policy.dir, or the
shipped policy): it compiles it, type-checks it against the input schema and evaluates every
decision for the standard probe inputs. A policy from a bundle server is downloaded at run time
and not checked here. It needs no privileges and changes nothing; it exits 1 on the first error.`,
		Example: `  tetherd check-config /etc/tether/tetherd.yaml && systemctl reload tetherd`,
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := *configPath
			if len(args) == 1 {
				path = args[0]
			}
			return checkConfig(cmd.Context(), cmd.OutOrStdout(), path)
		},
	}
}

func checkConfig(ctx context.Context, w io.Writer, path string) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	name := path
	if name == "" {
		name = "the embedded default configuration"
	}
	fmt.Fprintf(w, "%s: valid\n", name)
	summary, err := policy.CheckConfigured(ctx, cfg)
	if err != nil {
		return fmt.Errorf("the policy: %w", err)
	}
	fmt.Fprintln(w, summary)
	return nil
}

func newTailLog() *cobra.Command {
	var fromStart bool
	cmd := &cobra.Command{
		Use:   "tail-log FILE [--from-start]",
		Short: "Copy the decision log FILE to standard output as it grows, following its rotation",
		Long: `tail-log follows a decision log file tetherd writes (decision_log.path) and copies each record to
standard output as it is written, across rotations (FILE.1, ...), until it is stopped: the chart's
decisions container runs it, so the records are that container's log and tetherd's own log stays
off the decision stream.`,
		Example: "  tetherd tail-log /var/log/tether/decisions.jsonl",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return events.Follow(cmd.Context(), args[0], fromStart, cmd.OutOrStdout(), 100*time.Millisecond)
		},
	}
	cmd.Flags().BoolVar(&fromStart, "from-start", false, "copy what the file holds already too (default: only what comes after)")
	return cmd
}
