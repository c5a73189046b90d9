import ArgumentParser

@main
struct Provision: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "provision",
        abstract: "Write, verify and provision SD cards and Tegra boards.",
        subcommands: [
            // Each subcommand lives in its own file.
            TegraCommand.self,
        ]
    )
}
