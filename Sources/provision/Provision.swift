import ArgumentParser

@main
struct Provision: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "provision",
        abstract: "Write, verify and provision SD cards and Tegra boards.",
        subcommands: [
            WriteCommand.self,
            StatusCommand.self,
            WatchCommand.self,
            JobsCommand.self,
            DevicesCommand.self,
            MetricsCommand.self,
            FlashCommand.self,
            CancelCommand.self,
            ReloadCommand.self,
            ConfigCommand.self,
            TegraCommand.self,
            InjectCommand.self,
            BoardCommand.self,
            CardsCommand.self,
        ]
    )
}
