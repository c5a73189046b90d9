import ArgumentParser
import ControlProtocol

/// The station's metrics as the daemon reports them, for a scraper (node_exporter's textfile
/// collector, a bridge process) or a look by hand. provisiond has no IP socket: this is the way out.
struct MetricsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics",
        abstract: "Print the station's metrics in Prometheus' text format (cards, bytes, speeds, durations, running jobs, cache).",
        discussion: """
        Counters count since the daemon started. Every series carries a `station` label, so the
        output of several stations can be merged. Example, for node_exporter's textfile collector:
          provision metrics > /var/lib/node_exporter/provision.prom.tmp && mv /var/lib/node_exporter/provision.prom.tmp /var/lib/node_exporter/provision.prom
        """)
    @OptionGroup var options: ClientOptions

    func validate() throws {
        if options.json { throw ValidationError("metrics are Prometheus' text format; --json does not apply") }
    }

    func run() throws {
        try withClient(options) { client in
            print(try client.call(.metrics, returning: \.metrics), terminator: "")
        }
    }
}
