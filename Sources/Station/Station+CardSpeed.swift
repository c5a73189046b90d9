import Foundation
import ImageIO
import Pipeline

/// A card much slower than its peers is worth a look (issue 16): fake cards and worn ones
/// are often slow before they fail, and one slow card holds a whole batch back. Its
/// measured write speed is said next to its rated class in the job's end message, which
/// `provision status`, `provision jobs` and the journal all show.
enum CardSpeed {
    /// Peers needed before a card is called slow: fewer say little about this bench.
    static let minimumPeers = 3
    /// Slower than this share of the peers' median is "much slower".
    static let slowShare = 0.5

    /// The card's write speed: bytes written over the time writing and flushing them took.
    static func rate(_ write: WriteResult) -> Double? {
        let seconds = write.writeSeconds + write.syncSeconds
        return seconds > 0 && write.bytesWritten > 0 ? Double(write.bytesWritten) / seconds : nil
    }

    /// "slow card: wrote at 6.0 MB/s, 0.30× its peers' 20.0 MB/s (median of 4 cards); rated
    /// Class 10: 10 MB/s" — nil unless the card is much slower than enough peers.
    static func note(rate: Double, peers: [Double], rated: RatedSpeed?) -> String? {
        guard peers.count >= minimumPeers else { return nil }
        let sorted = peers.sorted()
        let median = sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        guard median > 0, rate < median * slowShare else { return nil }
        let ratedText = rated.map { "rated \($0)" + (rate < $0.bytesPerSecond ? ", below its rating" : "") }
            ?? "rated class unknown (no SD status register here: behind a USB reader)"
        return String(format: "slow card: wrote at %.1f MB/s, %.2f× its peers' %.1f MB/s (median of %d cards); ", rate / 1e6, rate / median, median / 1e6, peers.count)
            + ratedText
    }
}

extension Station {
    /// The slow-card note for a card that was written, from the ledger's peers.
    func slowCardNote(_ result: CardResult) async -> String? {
        guard let card = result.card, let rate = CardSpeed.rate(result.write),
              let peers = try? await ledger.peerWriteSpeeds(excluding: card.id) else { return nil }
        return CardSpeed.note(rate: rate, peers: peers, rated: result.facts.flatMap { RatedSpeed.read(syspath: $0.syspath) })
    }
}
