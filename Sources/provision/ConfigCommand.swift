import ArgumentParser
import Foundation
import Station

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "config", abstract: "Work with station configs offline.", subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "check", abstract: "Validate a station config: errors name file, line and key.",
            discussion: """
            Makes the checks the daemon makes at start and on reload (README.md, "What `config check` \
            checks"): the TOML itself (no NUL bytes, not empty, at least one slot), every key and \
            value (user names, uids, homes, shells, groups, GECOS, SSH keys and hashes), the files the \
            profiles name (images, bmaps, blobs), each image's partition table against the root \
            partition users go into, and the inventory. Exit status 0 when the daemon would accept the \
            file, 78 (EX_CONFIG) with the first error otherwise; warnings go to standard error.
            """)
        @Argument(help: "Station config (TOML).") var file: String = StationConfig.defaultPath

        func run() throws {
            do {
                let c = try StationConfig.load(file: file)
                // Issue 15: whether each image's own login can verify the hashes its users get.
                let checks = c.loginChecks()
                let verdict = checks.allSatisfy(\.problems.isEmpty) ? "ok" : "users who could never log in (below)"
                print("\(file): \(verdict) — station \(c.name), \(c.slots.count) slot(s), profiles: \(c.profiles.keys.sorted().joined(separator: ", "))")
                if let lab = c.lab {
                    let password = lab.passwordFile.map { "password from \($0)" } ?? "password from ~/.pgpass, if it has one"
                    print("  ledger: shared, \(lab.display) (\(password)); this station's copy and outbox: \(c.ledgerPath)")
                } else {
                    print("  ledger: \(c.ledgerPath)")
                }
                for slot in c.slots { print("  slot \(slot.name): \(slot.match) → \(slot.profile)") }
                for warning in c.warnings { FileHandle.standardError.write(Data("warning: \(warning)\n".utf8)) }
                for check in checks { print("  profile \(check.profile): \(check.capabilities?.description ?? check.note ?? "")") }
                if !checks.isEmpty { print("  generated passwords: \(c.passwordExportDestination.map { "appended to \($0)" } ?? "none may be generated (no password_export)")") }
                let problems = checks.flatMap(\.problems)
                if !problems.isEmpty { throw LoginProblems(problems: problems) }
            } catch {
                FileHandle.standardError.write(Data("\(error)\n".utf8))
                throw ExitCode(78)
            }
        }
    }
}

/// Users whose hashes the image cannot verify, one `file:line: key: message` line each.
struct LoginProblems: Error, CustomStringConvertible {
    let problems: [ConfigError]
    var description: String { problems.map(\.description).joined(separator: "\n") }
}
