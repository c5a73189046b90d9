// benchmarks/xzfill.sh's harness (issue 18): one cache fill of a compressed image, as the
// station's ImageCacheStore runs it, timed. Not part of any product.
//
//   cache-fill-bench IMAGE BMAP CACHE-FILE
//
// PROVISION_XZ_THREADS=1 forces the serial decoder; unset, every thread the fill's plan allows.
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ImageIO

let arguments = CommandLine.arguments
guard arguments.count == 4 else {
    FileHandle.standardError.write(Data("usage: cache-fill-bench IMAGE BMAP CACHE-FILE\n".utf8))
    exit(64)
}
do {
    let source = try ImageSource(path: arguments[1])
    let bmap = try Bmap.load(path: arguments[2])
    let started = ContinuousClock.now
    var plan = CacheFiller.plan(source: source, bmap: bmap, size: bmap.imageSize)
    // With no card reading, the station's fill stays on one thread (it adds threads for a card
    // that waits for it): the harness measures every thread the plan allows, from the start.
    if plan.addsThreadsOnDemand { plan = CacheFiller.plan(source: source, bmap: bmap, size: bmap.imageSize, xzThreads: plan.decoderThreads) }
    let progress = CacheFill()
    CacheFiller.fill(source: source, bmap: bmap, size: bmap.imageSize, into: arguments[3], progress: progress, plan: plan)
    let elapsed = ContinuousClock.now - started
    if let error = progress.error { throw error }
    let r = progress.report
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    print("threads=\(r.decoderThreads) blocks=\(r.blocks.map(String.init) ?? "-") decoded=\(r.blocksDecoded.map(String.init) ?? "-") skipped=\(r.blocksSkipped.map(String.init) ?? "-") seconds=\(String(format: "%.3f", seconds))")
} catch {
    FileHandle.standardError.write(Data("cache-fill-bench: \(error)\n".utf8))
    exit(1)
}
