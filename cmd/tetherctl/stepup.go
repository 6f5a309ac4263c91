package main

import (
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/stepup"
)

// agentSocket is where an agent reaches tetherd (env TETHER_AGENT_SOCKET).
func agentSocket() string {
	if s := os.Getenv("TETHER_AGENT_SOCKET"); s != "" {
		return s
	}
	return "/run/tether/agent.sock"
}

// newStepup: run inside an agent, ask for an extra right on the agent socket.
func newStepup(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "stepup", Short: "Ask for an extra right for this agent (run inside the agent)"}
	var socket string
	var req api.StepupRequest
	request := &cobra.Command{
		Use:   "request --action connect --resource R [--reason TEXT]",
		Short: "Ask for a step-up: the policy allows it, refuses it, or it waits for an admin (tetherctl approvals)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := api.NewClient(socket).RequestStepup(req)
			if err != nil {
				return err
			}
			return printStepups(cmd.OutOrStdout(), g, []stepup.Request{r})
		},
	}
	request.Flags().StringVar(&req.Action, "action", "connect", "what to do (the kernel enforces connect)")
	request.Flags().StringVar(&req.Resource, "resource", "", "on what (a network name of the policy)")
	request.Flags().StringVar(&req.Reason, "reason", "", "why, for the approver")
	request.MarkFlagRequired("resource")
	list := &cobra.Command{
		Use:   "list",
		Short: "This agent's step-up requests and what became of them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := api.NewClient(socket).MyStepups()
			if err != nil {
				return err
			}
			return printStepups(cmd.OutOrStdout(), g, l)
		},
	}
	for _, c := range []*cobra.Command{request, list} {
		c.Flags().StringVar(&socket, "agent-socket", agentSocket(), "tetherd's agent socket (env TETHER_AGENT_SOCKET)")
		addOutput(c, g)
	}
	cmd.AddCommand(request, list)
	return cmd
}

// newApprovals lists step-up requests (admins), once or as they come.
func newApprovals(g *globals) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "approvals [--follow]",
		Short: "List the agents' step-up requests (admins): pending ones wait for tetherctl approve or deny",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			seen := map[string]string{}
			for {
				l, err := g.client().Approvals()
				if err != nil {
					return err
				}
				var fresh []stepup.Request
				for _, r := range l {
					if seen[r.ID] != r.State {
						fresh = append(fresh, r)
						seen[r.ID] = r.State
					}
				}
				if len(fresh) > 0 || !follow {
					if err := printStepups(cmd.OutOrStdout(), g, fresh); err != nil {
						return err
					}
				}
				if !follow {
					return nil
				}
				select {
				case <-cmd.Context().Done():
					return nil
				case <-time.After(time.Second):
				}
			}
		},
	}
	cmd.Flags().BoolVar(&follow, "follow", false, "keep listing new and changed requests")
	addOutput(cmd, g)
	return cmd
}

func newApprove(g *globals) *cobra.Command {
	var req api.ApproveRequest
	cmd := newDecision(g, "approve REQUEST_ID [--uses N] [--ttl D]",
		"Approve a pending step-up request once (admins): the kernel allows N connects until the ttl",
		func(c *api.Client, id string) (stepup.Request, error) { return c.Approve(id, req) })
	cmd.Flags().Int64Var(&req.Uses, "uses", 1, "connects the approval allows, counted by the kernel (0: until it expires)")
	cmd.Flags().StringVar(&req.TTL, "ttl", "", "how long it holds (default: what the policy said)")
	expect(cmd, "ttl", kindDuration)
	return cmd
}

func newDeny(g *globals) *cobra.Command {
	var req api.DenyRequest
	cmd := newDecision(g, "deny REQUEST_ID [--why TEXT]", "Deny a pending step-up request (admins)",
		func(c *api.Client, id string) (stepup.Request, error) { return c.Deny(id, req) })
	cmd.Flags().StringVar(&req.Why, "why", "", "the reason, for the agent's log")
	return cmd
}

// newDecision is a verb that decides the step-up request its argument names and prints it.
func newDecision(g *globals, use, short string, decide func(c *api.Client, id string) (stepup.Request, error)) *cobra.Command {
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := decide(g.client(), args[0])
			if err != nil {
				return err
			}
			return printStepups(cmd.OutOrStdout(), g, []stepup.Request{r})
		},
	}
	addOutput(cmd, g)
	return cmd
}

func printStepups(w io.Writer, g *globals, l []stepup.Request) error {
	if g.output != "text" {
		for _, r := range l {
			if g.output == "yaml" {
				fmt.Fprintln(w, "---")
			}
			if err := g.print(w, r); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range l {
		fmt.Fprintf(tw, "%s\t%s\tagent %d %s\ttask %s\t%s %s\t%s\t%s\n", r.ID, r.State, r.Slot, r.SpiffeID, r.TaskID, r.Action, r.Resource,
			r.Reason, r.DecidedBy)
	}
	return tw.Flush()
}
