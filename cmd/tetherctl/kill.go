package main

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/api"
)

func newKill(g *globals) *cobra.Command {
	var req api.KillRequest
	var task string
	var pid int32
	var cl clusterKill
	cmd := &cobra.Command{
		Use:   "kill (SPIFFE_ID | SLOT | --task ID | --pid PID) --reason TEXT [--terminate] [--cluster ...]",
		Short: "Stop an agent: deny its network and exec, freeze it, revoke its identity (admins)",
		Long: `kill runs the kill path on every agent the argument names, in order, each step timed:
deny (the kernel denies every connect, sendmsg and exec of the agent), freeze (cgroup.freeze, until
the kernel reports it frozen), revoke (task credentials revoked, the SPIFFE ID denied to any new
agent, SPIRE entries deleted where identity.spire.server_socket is set; retried until done), and
with --terminate halt (cgroup.kill of the whole subtree). tetherctl resume thaws the agent for
investigation; it stays denied until tetherctl readmit.

With --cluster, kill on every node: an AgentKill is created through the Kubernetes API (the
kubeconfig of --kubeconfig, $KUBECONFIG, ~/.kube/config, or the pod's service account), selecting
the agents by SPIFFE_ID, --namespace (and --service-account) or --selector; every tetherd carries
it out and reports under its status (kubectl get agentkill NAME -o yaml). kubectl delete agentkill
NAME readmits.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cl.on {
				if len(args) == 1 {
					cl.spec.SpiffeID = args[0]
				}
				cl.spec.Reason, cl.spec.Terminate = req.Reason, req.Terminate
				return cl.create(cmd)
			}
			switch {
			case len(args) == 1 && strings.HasPrefix(args[0], "spiffe://"):
				if err := checkSPIFFEID(args[0]); err != nil {
					return err
				}
				req.SpiffeID = args[0]
			case len(args) == 1:
				slot, err := slotArg(args[0])
				if err != nil {
					return err
				}
				req.Slot = &slot
			}
			req.TaskID, req.PID = task, pid
			if req.Reason == "" {
				return errors.New("--reason is required")
			}
			kills, err := g.client().Kill(req)
			if err != nil {
				return err
			}
			if g.output != "text" {
				return g.print(cmd.OutOrStdout(), kills)
			}
			w := cmd.OutOrStdout()
			for _, k := range kills {
				fmt.Fprintf(w, "%s: agent %d (%s), done %v\n", k.ID, k.Slot, k.SpiffeID, k.Done)
				for _, s := range k.Steps {
					state := "done"
					if !s.Done {
						state = "NOT DONE: " + s.Error
					}
					fmt.Fprintf(w, "  %-7s %10s  %s  %s\n", s.Name, s.Took.Round(time.Microsecond), state, s.Detail)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&req.Reason, "reason", "", "why (recorded)")
	cmd.Flags().BoolVar(&req.Terminate, "terminate", false, "also kill every process of the agent (cgroup.kill)")
	cmd.Flags().StringVar(&task, "task", "", "the agent with this task")
	cmd.Flags().Int32Var(&pid, "pid", 0, "the agent this process belongs to")
	addOutput(cmd, g)
	cl.flags(cmd)
	return cmd
}

func newResume(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "resume SLOT",
		Short: "Thaw a killed agent for investigation (its network, exec and identity stay denied)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			slot, err := slotArg(args[0])
			if err != nil {
				return err
			}
			a, err := g.client().Resume(slot)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "agent %d (%s) thawed; killed %v\n", a.Slot, a.SpiffeID, a.Killed)
			return nil
		},
	}
}

func newReadmit(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "readmit SPIFFE_ID",
		Short: "Take a killed SPIFFE ID off the deny list and lift the kill of its agents (admins)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkSPIFFEID(args[0]); err != nil {
				return err
			}
			list, err := g.client().Readmit(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s readmitted; %d agents no longer killed\n", args[0], len(list))
			return nil
		},
	}
}

func newKills(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "kills",
		Short: "Kills still being finished, and the denied SPIFFE IDs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := g.client().Kills()
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), st)
		},
	}
}
