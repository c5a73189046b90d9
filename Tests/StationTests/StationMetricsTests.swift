import Foundation
import ImageIO
@testable import Station
import Testing
import TestSupport

/// `provision_running_jobs` says the present at every scrape: a manual flash's slot="" goes
/// back to 0 when it ends, and a slot a reload removed goes away. Each scrape is also checked
/// by promtool.
@Suite("Running jobs by slot")
struct StationMetricsTests {
    /// The running_jobs samples of a scrape, by slot.
    static func running(_ text: String) throws -> [String: Double] {
        let check = try Command.run(["promtool", "check", "metrics"], input: text, timeout: .seconds(30))
        #expect(check.succeeded, "promtool: \(check)")
        var found: [String: Double] = [:]
        for line in text.split(separator: "\n") where line.hasPrefix("provision_running_jobs{") {
            guard let slot = line.firstRange(of: "slot=\"").map({ line[$0.upperBound...].prefix { $0 != "\"" } }),
                  let value = line.split(separator: " ").last.flatMap({ Double($0) }) else { continue }
            found[String(slot)] = value
        }
        return found
    }

    @Test("a manual flash's slot=\"\" returns to 0 when it ends, and a slot removed by a reload is no longer shown")
    func gaugesSayThePresent() throws {
        var metrics = StationMetrics(station: "s")
        let usage = BufferBudget(limit: 1 << 20).usage
        // A fresh daemon shows its histograms at zero too: a rate() over a series that
        // appears with the first card loses that card.
        let fresh = metrics.text(slots: ["A"], running: [], cache: nil, buffers: usage)
        let lines = fresh.split(separator: "\n")
        for (name, label) in [("provision_write_speed_bytes_per_second_count", ""), ("provision_job_duration_seconds_count", "outcome=\"done\""),
                              ("provision_job_duration_seconds_count", "outcome=\"failed\"")] {
            #expect(lines.contains { $0.hasPrefix(name + "{") && (label.isEmpty || $0.contains(label)) && $0.hasSuffix(" 0") }, "\(name) \(label) at 0 in:\n\(fresh)")
        }
        #expect(try Self.running(metrics.text(slots: ["A", "B"], running: [nil, "A"], cache: nil, buffers: usage)) == ["": 1, "A": 1, "B": 0])
        #expect(try Self.running(metrics.text(slots: ["A", "B"], running: [], cache: nil, buffers: usage)) == ["": 0, "A": 0, "B": 0])
        // A reload: B is gone, C is new.
        #expect(try Self.running(metrics.text(slots: ["A", "C"], running: ["C"], cache: nil, buffers: usage)) == ["": 0, "A": 0, "C": 1])
    }
}
