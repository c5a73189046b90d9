import ArgumentParser

@main
struct Provision: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "provision",
        abstract: "Write, verify and provision SD cards and Tegra boards.",
        subcommands: [
            WriteCommand.self,
            TegraCommand.self,
        ]
    )
}
