using MixerFlow.Host.Files;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace MixerFlow.Host.Imaging;

/// <summary>A PNG line plot of bits/dim against training step: train and held-out series.</summary>
public static class TrainingCurve
{
    /// <summary>Width of the PNG in pixels.</summary>
    public const int Width = 800;
    /// <summary>Height of the PNG in pixels.</summary>
    public const int Height = 500;

    /// <summary>
    /// Writes the plot to <paramref name="path"/> atomically. Either list may be empty.
    /// Drawn with ScottPlot (axis labels "step" and "bits/dim", a legend naming "train" and
    /// <paramref name="heldOutLabel"/>, "held-out" unless told, for example "validation"); if ScottPlot's native renderer cannot be loaded, a plain plot without text is
    /// drawn instead (see <see cref="RenderPlain"/>), so a missing plotting library never stops a run.
    /// </summary>
    public static void Save(
        IReadOnlyList<(long Step, double Bpd)> train,
        IReadOnlyList<(long Step, double Bpd)> heldOut,
        string path,
        string title,
        string heldOutLabel = "held-out")
    {
        ArgumentNullException.ThrowIfNull(train);
        ArgumentNullException.ThrowIfNull(heldOut);
        byte[] png;
        try
        {
            png = RenderScottPlot(train, heldOut, title, heldOutLabel);
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or EntryPointNotFoundException or BadImageFormatException)
        {
            png = RenderPlain(train, heldOut);
        }
        AtomicFile.Write(path, (Stream s) => s.Write(png, 0, png.Length));
    }

    /// <summary>
    /// Writes one line per series (for example held-out bits/dim of several runs) to
    /// <paramref name="path"/> atomically, with a legend of the series' labels and the axis labels
    /// "step" and <paramref name="yLabel"/>. Falls back to the plain rendering (no text, the first two series only) where
    /// ScottPlot's native renderer cannot be loaded, as <see cref="Save"/> does.
    /// </summary>
    public static void SaveSeries(
        IReadOnlyList<(string Label, IReadOnlyList<(long Step, double Value)> Points)> series,
        string path, string title, string yLabel = "held-out bits/dim")
    {
        ArgumentNullException.ThrowIfNull(series);
        byte[] png;
        try
        {
            var plt = new ScottPlot.Plot();
            foreach (var (label, points) in series)
            {
                var (xs, ys) = Finite(points);
                if (xs.Length == 0) continue;
                var s = plt.Add.Scatter(xs, ys);
                s.LegendText = label;
                s.MarkerSize = xs.Length > 50 ? 0 : 5;
                s.LineWidth = 2f;
            }
            plt.Title(title);
            plt.XLabel("step");
            plt.YLabel(yLabel);
            if (series.Count > 0) plt.ShowLegend(ScottPlot.Alignment.UpperRight);
            png = plt.GetImage(Width, Height).GetImageBytes(ScottPlot.ImageFormat.Png);
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or EntryPointNotFoundException or BadImageFormatException)
        {
            png = series.Count switch
            {
                0 => RenderPlain([], []),
                1 => RenderPlain([], series[0].Points),
                _ => RenderPlain(series[0].Points, series[1].Points),
            };
        }
        AtomicFile.Write(path, (Stream s) => s.Write(png, 0, png.Length));
    }

    static (double[] Xs, double[] Ys) Finite(IReadOnlyList<(long Step, double Bpd)> points)
    {
        var kept = points.Where(p => double.IsFinite(p.Bpd)).ToArray();
        return (kept.Select(p => (double)p.Step).ToArray(), kept.Select(p => p.Bpd).ToArray());
    }

    /// <summary>The ScottPlot rendering, as PNG bytes.</summary>
    internal static byte[] RenderScottPlot(
        IReadOnlyList<(long Step, double Bpd)> train,
        IReadOnlyList<(long Step, double Bpd)> heldOut,
        string title,
        string heldOutLabel = "held-out")
    {
        var plt = new ScottPlot.Plot();
        var (tx, ty) = Finite(train);
        var (hx, hy) = Finite(heldOut);
        if (tx.Length > 0)
        {
            var s = plt.Add.Scatter(tx, ty, ScottPlot.Colors.C0);
            s.LegendText = "train";
            s.MarkerSize = tx.Length > 50 ? 0 : 4;
            s.LineWidth = 1.5f;
        }
        if (hx.Length > 0)
        {
            var s = plt.Add.Scatter(hx, hy, ScottPlot.Colors.C1);
            s.LegendText = heldOutLabel;
            s.MarkerSize = hx.Length > 50 ? 0 : 5;
            s.LineWidth = 2f;
        }
        plt.Title(title);
        plt.XLabel("step");
        plt.YLabel("bits/dim");
        if (tx.Length > 0 || hx.Length > 0)
            plt.ShowLegend(ScottPlot.Alignment.UpperRight);
        return plt.GetImage(Width, Height).GetImageBytes(ScottPlot.ImageFormat.Png);
    }

    /// <summary>
    /// The fallback rendering with ImageSharp alone (no text, since ImageSharp.Drawing is not
    /// available): white background, black axes, train in blue and held-out in orange, each a
    /// polyline drawn by Bresenham's algorithm over the same step and bits/dim ranges.
    /// </summary>
    internal static byte[] RenderPlain(
        IReadOnlyList<(long Step, double Bpd)> train,
        IReadOnlyList<(long Step, double Bpd)> heldOut)
    {
        const int left = 60, right = 20, top = 20, bottom = 50;
        using var image = new Image<Rgb24>(Width, Height, new Rgb24(255, 255, 255));
        var axis = new Rgb24(0, 0, 0);
        int x0 = left, x1 = Width - right, y0 = Height - bottom, y1 = top;
        Line(image, x0, y0, x1, y0, axis);
        Line(image, x0, y0, x0, y1, axis);
        for (int i = 0; i <= 10; i++)   // ticks
        {
            int x = x0 + (x1 - x0) * i / 10, y = y0 + (y1 - y0) * i / 10;
            Line(image, x, y0, x, y0 + 5, axis);
            Line(image, x0 - 5, y, x0, y, axis);
        }
        var series = new[] { (Finite(train), new Rgb24(31, 119, 180)), (Finite(heldOut), new Rgb24(255, 127, 14)) };
        var allX = series.SelectMany(s => s.Item1.Xs).ToArray();
        var allY = series.SelectMany(s => s.Item1.Ys).ToArray();
        if (allX.Length > 0)
        {
            double minX = allX.Min(), maxX = allX.Max(), minY = allY.Min(), maxY = allY.Max();
            if (maxX == minX) { minX -= 1; maxX += 1; }
            if (maxY == minY) { minY -= 0.5; maxY += 0.5; }
            double padY = 0.05 * (maxY - minY);
            minY -= padY; maxY += padY;
            foreach (var ((xs, ys), colour) in series)
            {
                int? px = null, py = null;
                for (int i = 0; i < xs.Length; i++)
                {
                    int qx = (int)Math.Round(x0 + (xs[i] - minX) / (maxX - minX) * (x1 - x0));
                    int qy = (int)Math.Round(y0 + (ys[i] - minY) / (maxY - minY) * (y1 - y0));
                    if (px is int ax && py is int ay)
                        Line(image, ax, ay, qx, qy, colour);
                    else
                        Line(image, qx, qy, qx, qy, colour);
                    px = qx; py = qy;
                }
            }
        }
        using var ms = new MemoryStream();
        image.SaveAsPng(ms);
        return ms.ToArray();
    }

    /// <summary>Bresenham's line, clipped to the image, two pixels thick.</summary>
    static void Line(Image<Rgb24> image, int xa, int ya, int xb, int yb, Rgb24 colour)
    {
        int dx = Math.Abs(xb - xa), sx = xa < xb ? 1 : -1;
        int dy = -Math.Abs(yb - ya), sy = ya < yb ? 1 : -1;
        int err = dx + dy;
        while (true)
        {
            Plot(xa, ya); Plot(xa + 1, ya); Plot(xa, ya + 1);
            if (xa == xb && ya == yb) break;
            int e2 = 2 * err;
            if (e2 >= dy) { err += dy; xa += sx; }
            if (e2 <= dx) { err += dx; ya += sy; }
        }

        void Plot(int x, int y)
        {
            if (x >= 0 && y >= 0 && x < image.Width && y < image.Height) image[x, y] = colour;
        }
    }
}
