package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/version"
)

type globals struct {
	socket string
	output string
	inputs []string
}

func (g *globals) client() *api.Client { return api.NewClient(g.socket) }

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "tetherctl",
		Short:         "Control tetherd: launch agents under an identity and see what is enforced",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.String(),
		// Flags are checked here, before any call to tetherd.
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error { return checkFlags(cmd) },
	}
	socket := os.Getenv("TETHER_SOCKET")
	if socket == "" {
		socket = "/run/tether/tether.sock"
	}
	root.PersistentFlags().StringVar(&g.socket, "socket", socket, "tetherd's control socket (env TETHER_SOCKET)")
	root.AddCommand(newRun(g), newStatus(g), newAgents(g), newMode(g), newSetKilled(g), newUnregister(g), newTask(g), newCredential(g), newKill(g), newResume(g), newReadmit(g), newKills(g), newEvents(g), newPolicy(g), newStepup(g), newApprovals(g), newApprove(g), newDeny(g))
	addCompletion(root, g)
	addExamples(root)
	return root
}

func addOutput(cmd *cobra.Command, g *globals) {
	cmd.Flags().StringVarP(&g.output, "output", "o", "text", "output format: text, json or yaml")
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// print writes v in the output format asked for (json, or yaml: the same fields, by their JSON
// names); text is each command's own.
func (g *globals) print(w io.Writer, v any) error {
	if g.output != "yaml" {
		return printJSON(w, v)
	}
	b, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func newStatus(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show tetherd's state: exec mode, active hooks, agents, counters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := g.client().Status()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if g.output != "text" {
				return g.print(w, st)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "version\t%s\n", st.Version)
			fmt.Fprintf(tw, "config\t%s\n", st.ConfigSource)
			fmt.Fprintf(tw, "cgroup2\t%s\n", st.Cgroup2)
			fmt.Fprintf(tw, "agent parents\t%s\n", strings.Join(st.AgentParents, ", "))
			fmt.Fprintf(tw, "pins\t%s\n", st.PinDir)
			fmt.Fprintf(tw, "exec mode\t%s (%s)\n", st.ExecMode, st.ExecReason)
			live := "packets dropped (cgroup_skb/egress)"
			if st.Sockets.Terminate {
				live = "terminated (bpf_sock_destroy), packets dropped until then (cgroup_skb/egress)"
			}
			fmt.Fprintf(tw, "revoked live sockets\t%s: %s\n", live, st.Sockets.Reason)
			fmt.Fprintf(tw, "detour headers\tsetsockopt refused (cgroup/setsockopt), packets dropped (cgroup_skb/egress)\n")
			sw := st.Sockets.Sweeps
			fmt.Fprintf(tw, "sweeps / sockets terminated / errors\t%d / %d / %d (last took %s)\n", sw.Sweeps, sw.Terminated, sw.Errors, sw.Last)
			fmt.Fprintf(tw, "policy\trevision %s from %s, %d revisions refused\n", st.Policy.Revision, st.Policy.Source, st.Policy.Refused)
			if st.Policy.LastError != "" {
				fmt.Fprintf(tw, "last refused policy\t%s\n", st.Policy.LastError)
			}
			fmt.Fprintf(tw, "agents\t%d\n", st.Agents)
			if id := st.Identity; id.Static > 0 || id.SPIRE != "" {
				fmt.Fprintf(tw, "identity discovery\t%d static rules, %d cgroups discovered, %d identities lost, %d conflicts\n", id.Static, id.Discovered, id.Lost, id.Conflicts)
			}
			if st.Identity.SPIRE != "" {
				fmt.Fprintf(tw, "spire\t%s\n", st.Identity.SPIRE)
			}
			if st.Identity.Self != "" {
				fmt.Fprintf(tw, "tetherd's SVID\t%s", st.Identity.Self)
				if !st.Identity.SelfExpires.IsZero() {
					fmt.Fprintf(tw, " (expires %s)", st.Identity.SelfExpires.Format(time.RFC3339))
				}
				fmt.Fprintln(tw)
			}
			fmt.Fprintf(tw, "ring buffer drops\t%d\n", st.Kernel.RingBufferDrops)
			fmt.Fprintf(tw, "events read / written\t%d / %d (ring buffer lost %d)\n", st.Events.Read, st.Events.Written, st.Kernel.RingBufferDrops)
			fmt.Fprintf(tw, "map writes failed / retried\t%d / %d\n", st.Registry.MapWriteFailures, st.Registry.MapWriteRetries)
			fmt.Fprintf(tw, "lineage update errors\t%d\n", st.Kernel.LineageUpdateErrors)
			fmt.Fprintf(tw, "signal errors\t%d\n", st.Kernel.SignalErrors)
			fmt.Fprintf(tw, "migrations found late\t%d\n", st.Kernel.MigrationsLate)
			fmt.Fprintf(tw, "socket storage / destroy errors\t%d / %d\n", st.Kernel.SockStorageErrors, st.Kernel.DestroyErrors)
			fmt.Fprintf(tw, "\nHOOK\tSECTION\tACTIVE\n")
			for _, h := range st.Hooks {
				active := "yes"
				if !h.Active {
					active = "no: " + h.Reason
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", h.Name, h.Section, active)
			}
			for _, w := range st.Warnings {
				fmt.Fprintf(tw, "warning\t%s\n", w)
			}
			return tw.Flush()
		},
	}
	addOutput(cmd, g)
	return cmd
}

func newAgents(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agents",
		Short: "List registered agents",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := g.client().Agents()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if g.output != "text" {
				return g.print(w, list)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "SLOT\tSPIFFE ID\tTASK\tMODE\tKILLED\tGEN\tSYNCED\tREFUSED\tCGROUP\n")
			for _, a := range list {
				task := "-"
				if a.Task != nil {
					task = a.Task.Type
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%v\t%d\t%v\t%d\t%s\n", a.Slot, a.SpiffeID, task, a.Mode, a.Killed, a.Generation, a.Synced, len(a.Refused), a.Cgroup)
			}
			return tw.Flush()
		},
	}
	addOutput(cmd, g)
	return cmd
}

// resolve turns a selector (a slot number or a SPIFFE ID) into the agents it names.
func resolve(c *api.Client, selector string) ([]agents.Agent, error) {
	if n, err := strconv.ParseUint(selector, 10, 32); err == nil {
		a, err := c.Agent(dataplane.Slot(n))
		if err != nil {
			return nil, err
		}
		return []agents.Agent{a}, nil
	}
	if err := checkSelector(selector); err != nil {
		return nil, err
	}
	list, err := c.Agents()
	if err != nil {
		return nil, err
	}
	var out []agents.Agent
	for _, a := range list {
		if a.SpiffeID == selector {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no agent has the identity %s", selector)
	}
	return out, nil
}

// forEach applies f to every agent the selector names.
func forEach(cmd *cobra.Command, g *globals, selector string, f func(c *api.Client, a agents.Agent) (agents.Agent, error)) error {
	c := g.client()
	list, err := resolve(c, selector)
	if err != nil {
		return err
	}
	for _, a := range list {
		got, err := f(c, a)
		if err != nil {
			return fmt.Errorf("agent %d: %w", a.Slot, err)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "agent %d (%s): mode %s, killed %v, generation %d, %s\n", got.Slot, got.SpiffeID, got.Mode, got.Killed, got.Generation, taskLine(got))
		for _, r := range got.Refused {
			fmt.Fprintf(cmd.OutOrStdout(), "  refused rule: %s\n", r)
		}
		if got.Error != "" {
			fmt.Fprintf(cmd.OutOrStdout(), "  error: %s\n", got.Error)
		}
	}
	return nil
}

func newMode(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "mode SLOT|SPIFFE_ID enforce|audit|default",
		Short: "Override an agent's mode (default: follow its grants)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var mode *string
			switch args[1] {
			case "enforce", "audit":
				mode = &args[1]
			case "default":
			default:
				return fmt.Errorf("mode %q: want enforce, audit or default", args[1])
			}
			return forEach(cmd, g, args[0], func(c *api.Client, a agents.Agent) (agents.Agent, error) {
				return c.SetMode(a.Slot, mode)
			})
		},
	}
}

func newSetKilled(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "set-killed SLOT|SPIFFE_ID true|false",
		Short: "Set or clear an agent's killed flag: while set, every connect and exec of the agent is denied",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			killed, err := strconv.ParseBool(args[1])
			if err != nil {
				return fmt.Errorf("%q: want true or false", args[1])
			}
			return forEach(cmd, g, args[0], func(c *api.Client, a agents.Agent) (agents.Agent, error) {
				return c.SetKilled(a.Slot, killed)
			})
		},
	}
}

func newUnregister(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "unregister SLOT|SPIFFE_ID",
		Short: "Unbind an agent (a launched agent's cgroup is removed with what still runs in it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := g.client()
			list, err := resolve(c, args[0])
			if err != nil {
				return err
			}
			for _, a := range list {
				if err := c.Unregister(a.Slot); err != nil {
					return fmt.Errorf("agent %d: %w", a.Slot, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "agent %d (%s) unregistered\n", a.Slot, a.SpiffeID)
			}
			return nil
		},
	}
}

func timeNow() time.Time { return time.Now() }
