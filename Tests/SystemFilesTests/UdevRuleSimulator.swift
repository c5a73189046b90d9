// Runs the project's udev rules against devices this machine does not have (USB card
// readers, SD hosts, Tegra boards in recovery mode) with udev's own rule engine.
//
// umockdev-run builds a fake /sys from a device description and preloads a library that
// redirects the program's /sys and /dev accesses to it; `udevadm test` then runs every rule
// on the fake device and prints the resulting properties (stdout) and what it assigned,
// e.g. "sdd: …/70-provision.rules:64 GROUP 1001" (stderr). `udevadm test` also writes
// udev's database in /run/udev, so it runs inside `unshare --mount` with tmpfs over
// /run/udev/data and /run/udev/tags, and with a private /run/udev/rules.d that holds only
// the rules under test: other tests installing rules at the same time cannot interfere.

import Foundation
import Testing
import TestSupport

/// One device of a fake sysfs tree, in umockdev's description format.
struct SimulatedDevice {
    var path: String
    var node: String? = nil
    var properties: [String: String] = [:]
    var attributes: [String: String] = [:]

    var description: String {
        var lines = ["P: \(path)"]
        if let node { lines.append("N: \(node)") }
        lines += properties.sorted { $0.key < $1.key }.map { "E: \($0.key)=\($0.value)" }
        lines += attributes.sorted { $0.key < $1.key }.map { "A: \($0.key)=\($0.value)" }
        return lines.joined(separator: "\n")
    }
}

/// What udev decided for the simulated device.
struct SimulationResult {
    var properties: [String: String]
    /// The last GROUP= that a rule applied, as a numeric gid (udevadm prints gids).
    var group: String?
    /// The last MODE= that a rule applied, e.g. "0660".
    var mode: String?
    /// Lines where udev complained about a rule file under test (syntax, unknown group).
    var diagnostics: [String]

    var currentTags: Set<String> {
        Set((properties["CURRENT_TAGS"] ?? "").split(separator: ":").map(String.init))
    }
}

enum UdevRuleSimulator {
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func rulesFile(_ name: String) -> String {
        packageRoot.appendingPathComponent("udev-rules/\(name)").path
    }

    /// Runs `udevadm test --action=ACTION` on `target` (a path under /sys present in
    /// `devices`) with the given rule files (name → text) as the only rules in /run/udev.
    static func simulate(
        _ devices: [SimulatedDevice], target: String, action: String = "add",
        rules: [String: String]
    ) throws -> SimulationResult {
        let work = try TemporaryDirectory("provision-udev-sim")
        defer { work.remove() }
        let rulesDirectory = work.path + "/rules.d"
        try FileManager.default.createDirectory(atPath: rulesDirectory, withIntermediateDirectories: true)
        for (name, text) in rules {
            try text.write(toFile: "\(rulesDirectory)/\(name)", atomically: true, encoding: .utf8)
        }
        let descriptionFile = work.path + "/devices.umockdev"
        try (devices.map(\.description).joined(separator: "\n\n") + "\n")
            .write(toFile: descriptionFile, atomically: true, encoding: .utf8)

        let script = """
            mkdir -p /run/udev/data /run/udev/tags /run/udev/rules.d
            mount -t tmpfs tmpfs /run/udev/data
            mount -t tmpfs tmpfs /run/udev/tags
            mount --bind "$1" /run/udev/rules.d
            exec umockdev-run -d "$2" -- udevadm test --action="$3" "$4"
            """
        let output = try Command.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "simulate",
             rulesDirectory, descriptionFile, action, "/sys" + target],
            timeout: .seconds(60))
        guard output.succeeded else {
            throw SimulationError(description: "udevadm test under umockdev failed: \(output)")
        }

        var properties: [String: String] = [:]
        for line in output.stdout.split(separator: "\n") {
            // Property lines are KEY=value with an upper-case key; the banner has no such line.
            guard let equals = line.firstIndex(of: "=") else { continue }
            let key = line[..<equals]
            guard !key.isEmpty, key.allSatisfy({ $0.isUppercase || $0.isNumber || $0 == "_" }) else { continue }
            properties[String(key)] = String(line[line.index(after: equals)...])
        }
        var group: String?
        var mode: String?
        var diagnostics: [String] = []
        for line in output.stderr.split(separator: "\n").map(String.init) {
            // "<sysname>: /run/udev/rules.d/<file>:<line> GROUP <gid>"
            let words = line.split(separator: " ")
            if words.count == 4, words[1].hasPrefix("/"), words[2] == "GROUP" { group = String(words[3]) }
            if words.count == 4, words[1].hasPrefix("/"), words[2] == "MODE" { mode = String(words[3]) }
            if rules.keys.contains(where: { line.hasPrefix("/run/udev/rules.d/\($0):") }) {
                diagnostics.append(line)
            }
        }
        return SimulationResult(properties: properties, group: group, mode: mode, diagnostics: diagnostics)
    }

    /// The project's main rules file, as a rules set for `simulate`.
    static func projectRules() throws -> [String: String] {
        ["70-provision.rules": try String(contentsOfFile: rulesFile("70-provision.rules"), encoding: .utf8)]
    }
}

struct SimulationError: Error, CustomStringConvertible {
    let description: String
}

/// udevd resolves GROUP= names when it loads rules: the group must exist first.
func provisionGroupID() throws -> String {
    try Command.check(["groupadd", "--force", "--system", "provision"])
    let entry = try Command.check(["getent", "group", "provision"]).stdout
    let fields = entry.split(separator: ":", omittingEmptySubsequences: false)
    guard fields.count >= 3 else { throw SimulationError(description: "getent group provision: \(entry)") }
    return String(fields[2])
}
