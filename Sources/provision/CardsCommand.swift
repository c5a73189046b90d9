import ArgumentParser
import ControlProtocol
import Foundation

/// `provision cards` and `provision cards forget ID` (issue 16): the cards the station
/// remembers, and an admin's way to clear one it refuses.
struct CardsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cards",
        abstract: "Cards the station remembers: refused ones (counterfeit, failing) first.",
        discussion: """
        A card found counterfeit (it stores less than it claims) or failing (it returned other \
        data twice) is refused on sight, with the date and reason, until an admin forgets it. \
        A card's ID is its SD CID (cid-…) where the card sits on an MMC host; behind a USB \
        reader it is the reader's serial, the card's size and its first sectors (rd-…), which is \
        weaker: cards alike in all three look the same, and a card rewritten elsewhere looks new.
        """,
        subcommands: [CardsListCommand.self, CardsForgetCommand.self],
        defaultSubcommand: CardsListCommand.self)
}

struct CardsListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List remembered cards.")
    @OptionGroup var options: ClientOptions

    func run() throws {
        try withClient(options) { client in
            let cards = try client.call(.cards, returning: \.cards)
            if options.json { try printJSON(cards); return }
            var rows = [["CARD", "VERDICT", "SINCE", "JOB", "REPAIRS", "MB/s", "REASON"]]
            let f = ISO8601DateFormatter()
            for c in cards {
                rows.append([c.id + (c.strength == "reader" ? " (weak)" : ""), c.verdict + (c.refused ? " — refused" : ""),
                             f.string(from: c.lastSeen), c.lastJob.map(String.init) ?? "-", "\(c.repairs)",
                             c.writeBytesPerSecond.map { String(format: "%.1f", $0 / 1e6) } ?? "-", c.reason ?? ""])
            }
            print(StatusTable.table(rows), terminator: "")
        }
    }
}

struct CardsForgetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "forget", abstract: "Forget a card, so that it is no longer refused (admins only).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The card's ID, as `provision cards` shows it (cid-… or rd-…).") var id: String

    func run() throws {
        try withClient(options) { client in
            let message = try client.call(.forgetCard, .init(card: id)).message ?? "card \(id) forgotten"
            if options.json { try printJSON(["message": message]) } else { print(message) }
        }
    }
}
