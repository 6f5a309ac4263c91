package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
)

func newTask(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "task", Short: "Start, renew and end an agent's task, and approve a step-up for it"}
	cmd.AddCommand(newTaskStart(g), newTaskRenew(g), newTaskEnd(g), newTaskApprove(g), newTaskHandoff(g))
	return cmd
}

// newTaskStart is `tetherctl task start`.
func newTaskStart(g *globals) *cobra.Command {
	var req api.TaskRequest
	start := &cobra.Command{
		Use:   "start SLOT|SPIFFE_ID --type TYPE [--sensitivity S] [--ttl D]",
		Short: "Start a task: the policy decides the agent's grants for it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return forEach(cmd, g, args[0], func(c *api.Client, a agents.Agent) (agents.Agent, error) {
				return c.StartTask(a.Slot, req)
			})
		},
	}
	start.Flags().StringVar(&req.Type, "type", "", "task type (coding, incident-response, customer-operations, ...)")
	start.Flags().StringVar(&req.Sensitivity, "sensitivity", "", "data sensitivity (public, internal, confidential, restricted)")
	start.Flags().StringVar(&req.TTL, "ttl", "1h", "the task ends unless renewed within this")
	start.Flags().StringVar(&req.ID, "id", "", "task id (default: made up)")
	start.MarkFlagRequired("type")
	expect(start, "ttl", kindDuration)
	expect(start, "sensitivity", "public", "internal", "confidential", "restricted")
	return start
}

// newTaskRenew is `tetherctl task renew`.
func newTaskRenew(g *globals) *cobra.Command {
	var ttl string
	renew := &cobra.Command{
		Use:   "renew SLOT|SPIFFE_ID [--ttl D]",
		Short: "Renew the agent's task for another ttl",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return forEach(cmd, g, args[0], func(c *api.Client, a agents.Agent) (agents.Agent, error) {
				return c.RenewTask(a.Slot, ttl)
			})
		},
	}
	renew.Flags().StringVar(&ttl, "ttl", "1h", "the new remaining lifetime")
	expect(renew, "ttl", kindDuration)
	return renew
}

// newTaskEnd is `tetherctl task end`.
func newTaskEnd(g *globals) *cobra.Command {
	end := &cobra.Command{
		Use:   "end SLOT|SPIFFE_ID",
		Short: "End the agent's task: its grants are evaluated without it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return forEach(cmd, g, args[0], func(c *api.Client, a agents.Agent) (agents.Agent, error) {
				return c.EndTask(a.Slot)
			})
		},
	}
	return end
}

// newTaskApprove is `tetherctl task approve`.
func newTaskApprove(g *globals) *cobra.Command {
	var ap api.ApprovalRequest
	approve := &cobra.Command{
		Use:   "approve SLOT|SPIFFE_ID --action A --resource R [--ttl D]",
		Short: "Record an approved step-up on the agent's task (admins)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return forEach(cmd, g, args[0], func(c *api.Client, a agents.Agent) (agents.Agent, error) {
				return c.AddApproval(a.Slot, ap)
			})
		},
	}
	approve.Flags().StringVar(&ap.Action, "action", "", "what is approved (connect, read-secret, ...)")
	approve.Flags().StringVar(&ap.Resource, "resource", "", "on what (a network name, a secret, ...)")
	approve.Flags().StringVar(&ap.TTL, "ttl", "15m", "how long the approval holds (never past the task)")
	approve.Flags().Int64Var(&ap.Uses, "uses", 0, "how many connects it allows, counted by the kernel (0: until it expires)")
	approve.MarkFlagRequired("action")
	approve.MarkFlagRequired("resource")
	expect(approve, "ttl", kindDuration)
	return approve
}

// newTaskHandoff is `tetherctl task handoff`.
func newTaskHandoff(g *globals) *cobra.Command {
	var ho api.HandoffRequest
	var hoCred string
	handoff := &cobra.Command{
		Use:   "handoff SLOT --to SLOT --credential TOKEN|@FILE [--type T] [--ttl D]",
		Short: "Hand the agent's task to another agent: its grants are at most the sender's",
		Long: `handoff gives the receiving agent a task derived from the sender's (same sensitivity, ending no
later), if the policy allows it (data.tether.stepup, action "handoff"). Whatever the policy grants
the receiver for it is cut down to what the sender has: never more. The sender's current task
credential proves the sender's task; the receiver gets a credential of its own.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			from, err := slotArg(args[0])
			if err != nil {
				return err
			}
			if ho.Credential, err = tokenArg(hoCred); err != nil {
				return err
			}
			res, err := g.client().Handoff(from, ho)
			if err != nil {
				return err
			}
			if g.output != "text" {
				return g.print(cmd.OutOrStdout(), res)
			}
			a := res.Agent
			fmt.Fprintf(cmd.OutOrStdout(), "agent %d (%s): %s from %s, credential %s in %s\n", a.Slot, a.SpiffeID, taskLine(a), a.Task.HandoffFrom, res.Credential.ID, res.Credential.File)
			return nil
		},
	}
	handoff.Flags().Uint32Var((*uint32)(&ho.To), "to", 0, "the receiving agent's slot")
	handoff.Flags().StringVar(&hoCred, "credential", "", "the sender's current task credential, or @FILE")
	handoff.Flags().StringVar(&ho.Type, "type", "", "the receiver's task type (default: the sender's)")
	handoff.Flags().StringVar(&ho.TTL, "ttl", "10m", "how long the handed task lasts (never past the sender's)")
	expect(handoff, "ttl", kindDuration)
	addOutput(handoff, g)
	handoff.MarkFlagRequired("to")
	handoff.MarkFlagRequired("credential")
	return handoff
}

func taskLine(a agents.Agent) string {
	if a.Task == nil {
		return "no task"
	}
	return fmt.Sprintf("task %s (%s, %s) until %s, %d approvals", a.Task.ID, a.Task.Type, a.Task.Sensitivity,
		a.Task.ExpiresAt.Format("15:04:05"), len(a.Task.Approvals))
}
