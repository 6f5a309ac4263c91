package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/events"
)

func newEvents(g *globals) *cobra.Command {
	var id, verdict string
	var follow bool
	var count int
	cmd := &cobra.Command{
		Use:   "events [--follow] [--id SPIFFE_ID] [--verdict deny] [--count N] [-o text|json|yaml]",
		Short: "Follow the live stream of decision records",
		Long: `events prints the decision records tetherd writes from now on (the same records as the
decision log), filtered by SPIFFE ID and verdict, until interrupted (--follow, the default) or
until --count records. A reader that does not keep up loses records; tetherctl says how many.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			w := cmd.OutOrStdout()
			enc := json.NewEncoder(w)
			n := 0
			return g.client().Events(ctx, id, verdict, func(d events.Decision) bool {
				switch g.output {
				case "json":
					enc.Encode(d)
				case "yaml":
					fmt.Fprintln(w, "---")
					g.print(w, d)
				default:
					fmt.Fprintf(w, "%s  %-10s %-12s %-28s %s (pid %d %s)\n", d.Timestamp.Format("15:04:05.000"), d.Verdict, d.Kind, d.Target(), d.SpiffeID, d.PID, d.Comm)
				}
				n++
				return (follow && count == 0) || n < count
			}, func(lost uint64) {
				fmt.Fprintf(os.Stderr, "tetherctl: %d records lost (this reader was too slow)\n", lost)
			})
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", true, "keep following (until interrupted or --count)")
	cmd.Flags().StringVar(&id, "id", "", "only this SPIFFE ID")
	cmd.Flags().StringVar(&verdict, "verdict", "", "only this verdict (allow, deny, audit-deny)")
	cmd.Flags().IntVar(&count, "count", 0, "stop after this many records")
	addOutput(cmd, g)
	expect(cmd, "id", kindSPIFFEID)
	expect(cmd, "verdict", "allow", "deny", "audit-deny")
	return cmd
}
