import ImageHTTP
import ImageIO
import Pipeline

/// The cache is what the card pipeline's supplier is in the daemon: a compressed image is
/// decompressed once and every card reads the result. An image named by URL is first
/// downloaded once per version (issue 17, ImageCacheStore+Downloads.swift).
extension ImageCacheStore: ImageSupplier {
    public func supply(image: String, bmap: Bmap?, cancelled: @escaping @Sendable () -> Bool,
                       downloading: @escaping @Sendable (UInt64, UInt64?) -> Void) throws(ImageIOError) -> SuppliedImage {
        var path = image
        var download: LocalImage?
        if HTTPImage.isURL(image) {
            download = try localImage(url: image, findBmap: false, cancelled: cancelled, progress: downloading)
            path = download!.path
            // What the station needs on a card for this image, known from now on (issue 17:
            // a too-small card is refused on sight, before the next download).
            if let bmap { noteImageSize(bmap.imageSize, download: download!.key) }
        }
        do throws(ImageIOError) {
            let (source, key, note) = try source(for: path, bmap: bmap)
            let notes = [download?.note, note.isEmpty ? nil : note].compactMap { $0 }
            return SuppliedImage(source: source, token: Self.token(cache: key, download: download?.key),
                                 note: notes.isEmpty ? nil : notes.joined(separator: "; "), checkedAgainstBmap: key != nil)
        } catch {
            releaseDownload(download?.key)
            throw error
        }
    }

    public func release(_ image: SuppliedImage) {
        let (cache, download) = Self.keys(image.token)
        release(cache)
        releaseDownload(download)
    }

    /// One token carries both handles: the decompressed entry's and the download's.
    private static func token(cache: String?, download: String?) -> String? {
        cache == nil && download == nil ? nil : "\(cache ?? "")/\(download ?? "")"
    }

    private static func keys(_ token: String?) -> (cache: String?, download: String?) {
        guard let token else { return (nil, nil) }
        let parts = token.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 else { return (token, nil) }
        return (parts[0].isEmpty ? nil : parts[0], parts[1].isEmpty ? nil : parts[1])
    }
}
