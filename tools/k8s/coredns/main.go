// Command coredns is CoreDNS cut down to the plugins the test cluster's DNS
// uses: the full build pulls in every cloud provider's SDK and takes several
// times as long to compile on a 2-core machine, for plugins never configured.
package main

import (
	"fmt"
	"os"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives lists the plugins in CoreDNS's execution order (plugin.cfg):
// a plugin registered but missing here could not be used in a Corefile.
var directives = []string{"bind", "ready", "health", "errors", "kubernetes"}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		fmt.Fprintln(os.Stderr, "coredns:", err)
		os.Exit(1)
	}
	coremain.Run()
}
