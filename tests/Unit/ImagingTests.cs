using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>PNG grids, training curves, atomic writes and the CSV log, checked by reading the files back.</summary>
public sealed class ImagingTests : IDisposable
{
    readonly string _dir = Path.Combine(Path.GetTempPath(), "mixerflow-imaging-" + Guid.NewGuid().ToString("N"));

    public ImagingTests() => Directory.CreateDirectory(_dir);

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    string PathTo(string name) => Path.Combine(_dir, name);

    [Fact]
    public void Grey_grid_has_expected_size_padding_and_pixel_positions()
    {
        // 5 images of 3 x 4 (H x W), 2 columns, scale 3, padding 2:
        // 3 rows; width 2*(4*3+2)+2 = 30, height 3*(3*3+2)+2 = 35.
        var images = zeros(5, 1, 3, 4);
        images[3, 0, 1, 2] = tensor(200.4f);   // image 3 is row 1, column 1; rounds to 200
        images[0, 0, 0, 0] = tensor(999f);     // clamped to 255
        images[1, 0, 2, 3] = tensor(-7f);      // clamped to 0 (already 0 around it)
        var path = PathTo("grid.png");
        ImageGrid.Save(images, path, columns: 2, scale: 3, padding: 2);

        using var img = Image.Load<L8>(path);
        Assert.Equal(30, img.Width);
        Assert.Equal(35, img.Height);
        Assert.Equal((30, 35), ImageGrid.GridSize(5, 3, 4, columns: 2, scale: 3, padding: 2));

        // Image 3's tile starts at x = 2 + 1*(12+2) = 16, y = 2 + 1*(9+2) = 13;
        // its pixel (row 1, col 2) covers x 16+6..16+8, y 13+3..13+5.
        for (int y = 16; y < 19; y++)
            for (int x = 22; x < 25; x++)
                Assert.Equal(200, img[x, y].PackedValue);
        Assert.Equal(0, img[21, 16].PackedValue);   // neighbouring pixel of the same tile
        Assert.Equal(0, img[25, 15].PackedValue);
        // Clamped top-left pixel of image 0 (tile at 2, 2).
        Assert.Equal(255, img[2, 2].PackedValue);
        Assert.Equal(255, img[4, 4].PackedValue);
        Assert.Equal(0, img[5, 2].PackedValue);
        // Padding: border, gap between tiles, and the empty sixth cell are grey.
        Assert.Equal(ImageGrid.PaddingValue, img[0, 0].PackedValue);
        Assert.Equal(ImageGrid.PaddingValue, img[14, 5].PackedValue);
        Assert.Equal(ImageGrid.PaddingValue, img[20, 28].PackedValue);
        // No temporary file is left beside it.
        Assert.Equal(new[] { "grid.png" }, Directory.GetFiles(_dir).Select(Path.GetFileName));
    }

    [Fact]
    public void Colour_grid_preserves_channels_and_accepts_other_dtypes()
    {
        // Two 2 x 2 RGB images as float64: image 0 pure red, image 1 a distinct colour per pixel.
        var images = zeros(2, 3, 2, 2, dtype: float64);
        images[0, 0] = tensor(255.0);
        images[1, 0, 0, 1] = tensor(10.0);
        images[1, 1, 0, 1] = tensor(20.0);
        images[1, 2, 0, 1] = tensor(30.0);
        images[1, 2, 1, 0] = tensor(254.6);
        var path = PathTo("rgb.png");
        ImageGrid.Save(images, path, columns: 8, scale: 1, padding: 1);

        using var img = Image.Load<Rgb24>(path);
        Assert.Equal(2 * (2 + 1) + 1, img.Width);   // only 2 columns used
        Assert.Equal(2 + 2, img.Height);
        Assert.Equal(new Rgb24(255, 0, 0), img[1, 1]);
        Assert.Equal(new Rgb24(255, 0, 0), img[2, 2]);
        // Image 1 starts at x = 4.
        Assert.Equal(new Rgb24(0, 0, 0), img[4, 1]);
        Assert.Equal(new Rgb24(10, 20, 30), img[5, 1]);
        Assert.Equal(new Rgb24(0, 0, 255), img[4, 2]);
        Assert.Equal(new Rgb24(128, 128, 128), img[3, 1]);
    }

    [Fact]
    public void Pairs_put_each_reconstruction_right_of_its_original()
    {
        // 6 pairs of 1 x 2 x 2, 4 pairs per row: 8 columns, 2 rows, scale 2, padding 1.
        var originals = full(6, 1, 2, 2, 50f);
        var recon = full(6, 1, 2, 2, 100f);
        originals[5] = tensor(60f);
        recon[5] = tensor(110f);
        var path = PathTo("pairs.png");
        ImageGrid.SavePairs(originals, recon, path, scale: 2);

        using var img = Image.Load<L8>(path);
        Assert.Equal(8 * (2 * 2 + 1) + 1, img.Width);
        Assert.Equal(2 * (2 * 2 + 1) + 1, img.Height);
        Assert.Equal(50, img[1, 1].PackedValue);     // pair 0 original
        Assert.Equal(100, img[6, 1].PackedValue);    // pair 0 reconstruction
        // Pair 5 is in row 1, second pair: original in column 2, reconstruction in column 3.
        Assert.Equal(60, img[1 + 2 * 5, 6].PackedValue);
        Assert.Equal(110, img[1 + 3 * 5, 6].PackedValue);
        Assert.Throws<ArgumentException>(() => ImageGrid.SavePairs(originals, recon[..3], PathTo("bad.png")));
    }

    static void AssertPlotLooksDrawn(string path)
    {
        Assert.True(File.Exists(path));
        using var img = Image.Load<Rgb24>(path);
        Assert.Equal(800, img.Width);
        Assert.Equal(500, img.Height);
        var colours = new HashSet<Rgb24>();
        for (int y = 0; y < img.Height; y += 3)
            for (int x = 0; x < img.Width; x += 3)
                colours.Add(img[x, y]);
        Assert.True(colours.Count > 3, $"only {colours.Count} colours in the plot");
    }

    static List<(long Step, double Bpd)> Curve(int n, double start, long every) =>
        Enumerable.Range(0, n).Select(i => ((long)i * every, start / Math.Sqrt(1 + i))).ToList();

    [Fact]
    public void Training_curve_is_an_800x500_png_with_content()
    {
        var path = PathTo("curve.png");
        TrainingCurve.Save(Curve(200, 8.0, 10), Curve(10, 8.5, 200), path, "test run");
        AssertPlotLooksDrawn(path);

        // An empty held-out series works, and so does a rewrite of the same file.
        TrainingCurve.Save(Curve(3, 6.0, 1), Array.Empty<(long, double)>(), path, "train only");
        AssertPlotLooksDrawn(path);
        Assert.Single(Directory.GetFiles(_dir));
    }

    [Fact]
    public void ScottPlot_renders_on_this_machine_and_the_fallback_draws_lines()
    {
        // Called directly, so a failure to load SkiaSharp's natives shows here instead of being
        // hidden by the fallback.
        var png = TrainingCurve.RenderScottPlot(Curve(50, 5, 1), Curve(5, 5.5, 10), "scottplot");
        File.WriteAllBytes(PathTo("scottplot.png"), png);
        AssertPlotLooksDrawn(PathTo("scottplot.png"));

        var plain = TrainingCurve.RenderPlain(Curve(50, 5, 1), Curve(5, 5.5, 10));
        File.WriteAllBytes(PathTo("plain.png"), plain);
        AssertPlotLooksDrawn(PathTo("plain.png"));
        using var img = Image.Load<Rgb24>(PathTo("plain.png"));
        bool HasColour(Rgb24 c) { for (int y = 0; y < img.Height; y++) for (int x = 0; x < img.Width; x++) if (img[x, y].Equals(c)) return true; return false; }
        Assert.True(HasColour(new Rgb24(31, 119, 180)));   // train
        Assert.True(HasColour(new Rgb24(255, 127, 14)));   // held-out
    }

    [Fact]
    public void Atomic_write_keeps_old_content_and_leaves_no_temp_file_when_the_writer_throws()
    {
        var path = PathTo("state.txt");
        AtomicFile.WriteAllText(path, "old");
        Assert.Throws<InvalidOperationException>(() => AtomicFile.Write(path, (Stream s) =>
        {
            s.Write(new byte[] { 1, 2, 3 });
            throw new InvalidOperationException("crash mid-write");
        }));
        Assert.Equal("old", File.ReadAllText(path));
        Assert.Equal(new[] { "state.txt" }, Directory.GetFiles(_dir).Select(Path.GetFileName));

        // The path-based variant: also rolled back on failure, replaced on success.
        Assert.Throws<IOException>(() => AtomicFile.Write(path, (string temp) =>
        {
            File.WriteAllText(temp, "half");
            throw new IOException("crash mid-save");
        }));
        Assert.Equal("old", File.ReadAllText(path));
        Assert.Single(Directory.GetFiles(_dir));
        AtomicFile.Write(path, (string temp) =>
        {
            Assert.NotEqual(Path.GetFullPath(path), temp);
            Assert.Equal(_dir, Path.GetDirectoryName(temp));
            File.WriteAllText(temp, "new");
        });
        Assert.Equal("new", File.ReadAllText(path));
        Assert.Single(Directory.GetFiles(_dir));
    }

    [Fact]
    public void Csv_log_writes_the_header_once_across_a_resume_and_reads_back()
    {
        var path = PathTo("metrics.csv");
        string[] columns = { "step", "epoch", "train_bpd", "heldout_bpd", "lr", "images_per_s", "dropped_steps" };
        var culture = Thread.CurrentThread.CurrentCulture;
        try
        {
            // A comma-decimal culture must not leak into the file.
            Thread.CurrentThread.CurrentCulture = new System.Globalization.CultureInfo("de-DE");
            var log = new CsvLog(path, columns);
            log.Append(100L, 1, 3.25, null, 1e-3, 512.5, 0);
            log.Append(200L, 1, 3.125, 3.5, 1e-3, 498.0, 2);

            var resumed = new CsvLog(path, columns);   // a resumed run opens the same file
            resumed.Append(new Dictionary<string, object?> { ["step"] = 300L, ["epoch"] = 2, ["train_bpd"] = 3.0, ["lr"] = 5e-4 });
        }
        finally { Thread.CurrentThread.CurrentCulture = culture; }

        var lines = File.ReadAllLines(path);
        Assert.Equal(4, lines.Length);
        Assert.Equal(string.Join(",", columns), lines[0]);
        Assert.Single(lines, l => l.StartsWith("step,"));
        Assert.Equal("100,1,3.25,,0.001,512.5,0", lines[1]);

        var rows = CsvLog.Read(path);
        Assert.Equal(3, rows.Count);
        Assert.Equal("200", rows[1]["step"]);
        Assert.Equal(3.5, double.Parse(rows[1]["heldout_bpd"], System.Globalization.CultureInfo.InvariantCulture));
        Assert.Equal("", rows[0]["heldout_bpd"]);
        Assert.Equal("300", rows[2]["step"]);
        Assert.Equal("0.0005", rows[2]["lr"]);
        Assert.Equal("", rows[2]["dropped_steps"]);
        Assert.All(rows, r => Assert.Equal(columns, r.Keys));

        Assert.Throws<InvalidDataException>(() => new CsvLog(path, "step", "loss"));
    }
}
