// CoreDNS for the test bed's real node (docs/TESTBED.md, "The real node"): only the plugins
// its Corefile uses, so the build compiles no cloud or backend SDKs.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugin chain runs in this order (a subset of CoreDNS's own plugin.cfg order).
func init() {
	dnsserver.Directives = []string{"bind", "ready", "errors", "log", "kubernetes"}
}

func main() { coremain.Run() }
