package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tether-sh/tether/pkg/fleet"
)

// clusterKill is kill --cluster: an AgentKill for every tetherd of the cluster.
type clusterKill struct {
	on         bool
	kubeconfig string
	selector   string
	spec       fleet.Spec
}

func (c *clusterKill) flags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.BoolVar(&c.on, "cluster", false, "kill on every node of the Kubernetes cluster (an AgentKill)")
	f.StringVar(&c.kubeconfig, "kubeconfig", "", "with --cluster: the kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
	f.StringVar(&c.spec.Namespace, "namespace", "", "with --cluster: the agent pods of this namespace")
	f.StringVar(&c.spec.ServiceAccount, "service-account", "", "with --cluster and --namespace: of this service account")
	f.StringVarP(&c.selector, "selector", "l", "", "with --cluster: the agent pods with these labels (key=value,...)")
}

// create creates the AgentKill and prints its name.
func (c *clusterKill) create(cmd *cobra.Command) error {
	if c.selector != "" {
		sel, err := metav1.ParseToLabelSelector(c.selector)
		if err != nil {
			return fmt.Errorf("--selector: %w", err)
		}
		c.spec.PodSelector = sel
	}
	spec, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&c.spec)
	if err != nil {
		return err
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": fleet.Resource.GroupVersion().String(), "kind": fleet.Kind,
		"metadata": map[string]any{"generateName": "kill-"}, "spec": spec,
	}}
	if _, _, err := fleet.Decode(u); err != nil {
		return err
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = c.kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
	defer cancel()
	created, err := client.Resource(fleet.Resource).Create(ctx, u, metav1.CreateOptions{})
	if err != nil {
		return errors.Join(errors.New("creating the AgentKill"), err)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "agentkill/%s created: every node carries it out (kubectl get agentkill %s -o yaml); kubectl delete agentkill %s readmits\n",
		created.GetName(), created.GetName(), created.GetName())
	return nil
}
