import ArgumentParser
import BlockDevices
import ControlProtocol
@preconcurrency import Dispatch
import Foundation
import Logging
import ProvisionCShims
import ServiceLifecycle
import Station

/// provisiond: wiring only (DESIGN.md §1). Config, ledger, discovery, the control socket and
/// systemd integration, each a Service in one ServiceGroup that stops on SIGTERM/SIGINT.
@main
struct Provisiond: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "provisiond",
        abstract: "The provision daemon: writes, verifies and provisions cards as they are plugged in.",
        discussion: """
        Reads the station config (TOML), watches udev for cards and Tegra boards in recovery mode, \
        and answers `provision` on a Unix socket. Under systemd it uses socket activation, \
        sd_notify (READY, STATUS, WATCHDOG) and logs to the journal with PROVISION_* fields. \
        SIGHUP reloads the config.
        """)

    @Option(help: "Station config file.")
    var config: String = StationConfig.defaultPath

    @Option(help: "Control socket path. When systemd passes a socket (provisiond.socket), that socket is used, and its group is read from the path it is bound to.")
    var socket: String = ControlProtocol.defaultSocketPath

    @Option(help: "Group whose members may read status (the socket's group).")
    var socketGroup: String = "provision"

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func run() async throws {
        // A station writes hundreds of cards between restarts, and each card's buffers, zstd
        // window and xz dictionary are megabytes malloc'd on a thread of its own. glibc's
        // dynamic mmap threshold grows to the largest block freed, after which such blocks come
        // from per-thread arenas that keep them: resident memory rose ~45 MB per 100 cards
        // with no leak at all (EnduranceTests). A fixed threshold keeps every block of 256 KiB
        // or more a mapping of its own, returned when the card is done.
        _ = provision_fix_mmap_threshold(256 << 10)
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler: LogHandler = JournalLogHandler.isConnected ? JournalLogHandler(label: label) : StderrLogHandler(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "provisiond")

        let stationConfig: StationConfig
        do {
            stationConfig = try StationConfig.load(file: config)
        } catch {
            FileHandle.standardError.write(Data("provisiond: \(error)\n".utf8))
            throw ExitCode(78)  // EX_CONFIG
        }
        // Before anything else opens a descriptor: what the cap on clients is computed from.
        let descriptorLimit = DescriptorBudget.raiseSoftLimit()
        // One daemon per ledger and cache, decided before either is touched (opening the
        // cache empties it).
        let locks: [InstanceLock]
        do {
            locks = [try InstanceLock("ledger", path: stationConfig.ledgerPath, directory: false),
                     try InstanceLock("image cache", path: stationConfig.cacheDirectory, directory: true)]
        } catch let held as InstanceLock.Held {
            FileHandle.standardError.write(Data("provisiond: \(held)\n".utf8))
            throw ExitCode(75)  // EX_TEMPFAIL
        } catch {
            FileHandle.standardError.write(Data("provisiond: \(error)\n".utf8))
            throw ExitCode(73)  // EX_CANTCREAT
        }
        let ledger: Ledger
        do {
            ledger = try Ledger(path: stationConfig.ledgerPath, lab: stationConfig.lab, station: stationConfig.name)
        } catch {
            FileHandle.standardError.write(Data("provisiond: cannot open the ledger \(stationConfig.ledgerPath): \(error)\n".utf8))
            throw ExitCode(73)  // EX_CANTCREAT
        }
        let cache: ImageCacheStore
        do {
            cache = try ImageCacheStore(directory: stationConfig.cacheDirectory, limit: stationConfig.cacheLimit)
        } catch {
            FileHandle.standardError.write(Data("provisiond: cannot use the image cache \(stationConfig.cacheDirectory): \(error)\n".utf8))
            throw ExitCode(73)
        }
        let station = Station(config: stationConfig, ledger: ledger, logger: logger, cache: cache)
        try await station.recoverFromLedger()

        let notifier = SystemdNotifier(station: station, logger: logger)
        // The udev monitor's socket is opened before the control socket takes any client.
        let discovery = try Discovery(station: station, logger: logger)
        let admission = ClientAdmission(config: stationConfig, descriptorLimit: descriptorLimit, logger: logger)
        let server = ControlServer(station: station, socketPath: socket, socketGroup: socketGroup, configPath: config,
                                   notifier: notifier, admission: admission, logger: logger)
        let reloader = Reloader(station: station, configPath: config, admission: admission, logger: logger)
        let group = ServiceGroup(configuration: .init(
            services: [
                .init(service: discovery),
                .init(service: server),
                .init(service: notifier),
                .init(service: reloader),
            ] + (ledger.shared.map { [.init(service: SharedLedgerService(shared: $0))] } ?? []),
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        for warning in stationConfig.warnings { logger.warning("\(warning)") }
        logger.info("provisiond starting: station \(stationConfig.name), \(stationConfig.slots.count) slot(s), ledger \(stationConfig.lab.map { "\($0.display) (local copy and outbox \(stationConfig.ledgerPath))" } ?? stationConfig.ledgerPath)")
        try await group.run()
        // Jobs still writing are cancelled, so the ledger says "cancelled", not "interrupted".
        let cancelled = await station.cancelAll(waitingUpTo: .seconds(10))
        if cancelled > 0 { logger.notice("cancelled \(cancelled) running job(s) at shutdown") }
        logger.info("provisiond stopped")
        withExtendedLifetime(locks) {}
    }
}

/// SIGHUP: read the config again; a broken file keeps the running config and says why.
struct Reloader: Service {
    let station: Station
    let configPath: String
    let admission: ClientAdmission
    let logger: Logger

    func run() async throws {
        let signals = AsyncStream<Void> { continuation in
            let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
            signal(SIGHUP, SIG_IGN)
            source.setEventHandler { continuation.yield() }
            source.resume()
            continuation.onTermination = { _ in source.cancel() }
        }
        await withGracefulShutdownHandler {
            for await _ in signals.cancelOnGracefulShutdown() {
                _ = await reload(station: station, configPath: configPath, admission: admission, logger: logger)
            }
        } onGracefulShutdown: {}
    }
}

/// Loads the config file again and applies it; the result names the settings that wait for a
/// restart (see `StationConfig.keepStartSettings`).
func reload(station: Station, configPath: String, admission: ClientAdmission, logger: Logger) async -> Result<(config: StationConfig, kept: [String]), Error> {
    // Loading reads and decompresses the start of every image: blocking I/O, so on a
    // thread of its own rather than the cooperative pool.
    let loaded = await withCheckedContinuation { (done: CheckedContinuation<Result<StationConfig, Error>, Never>) in
        Thread {
            provision_name_thread("prov-reload")
            done.resume(returning: Result { try StationConfig.load(file: configPath) })
        }.start()
    }
    switch loaded {
    case .success(let config):
        let (applied, kept) = await station.reload(config)
        admission.apply(applied)
        logger.notice("configuration reloaded from \(configPath)")
        if !kept.isEmpty { logger.warning("reload: \(kept.joined(separator: ", ")) changed in \(configPath); not applied until provisiond restarts (the running values stay)") }
        for warning in config.warnings { logger.warning("\(warning)") }
        return .success((applied, kept))
    case .failure(let error):
        logger.error("reload failed, keeping the running configuration: \(error)")
        await station.refuseReload(file: configPath, reason: "\(error)")
        return .failure(error)
    }
}
