package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
)

func newCredential(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "credential", Short: "Task credentials: show, heartbeat, verify, and the revocation list"}
	show := &cobra.Command{
		Use:   "show SLOT",
		Short: "The current credential of the agent's task (its launcher or an admin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			slot, err := slotArg(args[0])
			if err != nil {
				return err
			}
			cred, err := g.client().TaskCredential(slot)
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), cred)
		},
	}
	var presented, ttl string
	heartbeat := &cobra.Command{
		Use:   "heartbeat SLOT --credential TOKEN|@FILE [--ttl D]",
		Short: "Present the task's current credential: renews the task and prints the next credential",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			slot, err := slotArg(args[0])
			if err != nil {
				return err
			}
			tok, err := tokenArg(presented)
			if err != nil {
				return err
			}
			cred, err := g.client().Heartbeat(slot, tok, ttl)
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), cred)
		},
	}
	heartbeat.Flags().StringVar(&presented, "credential", "", "the current credential, or @FILE to read it from a file")
	heartbeat.Flags().StringVar(&ttl, "ttl", "2m", "renew the task for this long")
	heartbeat.MarkFlagRequired("credential")
	expect(heartbeat, "ttl", kindDuration)
	verify := &cobra.Command{
		Use:   "verify TOKEN|@FILE|-",
		Short: "Check a tether task credential (signature, expiry, revocation) and print its claims",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := tokenArg(args[0])
			if err != nil {
				return err
			}
			claims, err := g.client().VerifyCredential(tok)
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), claims)
		},
	}
	revoked := &cobra.Command{
		Use:   "revoked",
		Short: "The revocation list: revoked task credentials that have not expired",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			list, err := g.client().RevokedCredentials()
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), list)
		},
	}
	cmd.AddCommand(show, heartbeat, verify, revoked)
	return cmd
}

func slotArg(s string) (dataplane.Slot, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("agent slot %q: want a number", s)
	}
	return dataplane.Slot(n), nil
}

// tokenArg is a token given as itself, @FILE, or - (standard input).
func tokenArg(s string) (string, error) {
	var b []byte
	var err error
	switch {
	case s == "-":
		b, err = io.ReadAll(io.LimitReader(os.Stdin, 64<<10))
	case strings.HasPrefix(s, "@"):
		b, err = os.ReadFile(s[1:])
	default:
		return s, nil
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// supervise sends the launcher's heartbeats for the agent's task until stop is closed: each
// presents the current credential, renews the task for ttl and brings the next credential.
// When a heartbeat is refused for good (the task ended, or the credential was revoked), the
// heartbeats stop: the task is over.
func supervise(c *api.Client, slot dataplane.Slot, cur credentials.Credential, ttl time.Duration, stop <-chan struct{}) {
	for {
		wait := ttl / 3
		if left := time.Until(cur.ExpiresAt) / 3; left > 0 && left < wait {
			wait = left
		}
		select {
		case <-stop:
			return
		case <-time.After(wait):
		}
		next, err := c.Heartbeat(slot, cur.Token, ttl.String())
		if err == nil {
			cur = next
			continue
		}
		// The agent renewed its task itself (agent socket), which superseded the credential
		// this launcher held: carry on from the current one.
		code := api.CodeOf(err)
		if code == api.CodeCredentialReplayed {
			if now, err := c.TaskCredential(slot); err == nil && now.Token != cur.Token {
				cur = now
				continue
			}
		}
		fmt.Fprintf(os.Stderr, "tetherctl: heartbeat for agent %d: %v\n", slot, err)
		switch code {
		case api.CodeNoTask, api.CodeCredentialRevoked, api.CodeCredentialReplayed, api.CodeCredentialExpired:
			return
		}
	}
}
