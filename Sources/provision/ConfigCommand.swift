import ArgumentParser
import Foundation
import Station

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "config", abstract: "Work with station configs offline.", subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "check", abstract: "Validate a station config: errors name file, line and key.")
        @Argument(help: "Station config (TOML).") var file: String = StationConfig.defaultPath

        func run() throws {
            do {
                let c = try StationConfig.load(file: file)
                print("\(file): ok — station \(c.name), \(c.slots.count) slot(s), profiles: \(c.profiles.keys.sorted().joined(separator: ", "))")
                for slot in c.slots { print("  slot \(slot.name): \(slot.match) → \(slot.profile)") }
            } catch {
                FileHandle.standardError.write(Data("\(error)\n".utf8))
                throw ExitCode(78)
            }
        }
    }
}
